"""PNG plots of ``blip eval``: parity, calibration curve, error versus predicted std, and the
noise coefficients alpha/beta per layer for the ID and OOD sets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from blip_ase.inference.calibration import apply_isotonic, variance_factors
from blip_ase.uq import metrics as m

if TYPE_CHECKING:
    from blip_ase.uq.predictions import Predictions

COLOURS = {"id": "tab:blue", "ood": "tab:red"}


def _parity(ax, true: np.ndarray, pred: np.ndarray, colour: str, label: str) -> None:
    ax.scatter(true, pred, s=6, alpha=0.6, color=colour, label=label, edgecolors="none")


def _diagonal(ax) -> None:
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)


def plot_coefficients(path: Path, coefficients: dict[str, dict[str, np.ndarray]]) -> None:
    """Box plots (5th-95th percentile whiskers, log axis) of alpha per message layer and beta
    per update layer, one box per data set (ID blue, OOD red) side by side."""
    from matplotlib.figure import Figure

    kinds = [k for k in ("edge", "node") if next(iter(coefficients.values()))[k].shape[1]]
    fig = Figure(figsize=(4.5 * len(kinds), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(kinds)))
    names = list(coefficients)
    width = 0.8 / len(names)
    for ax, kind in zip(axes, kinds):
        n_layers = coefficients[names[0]][kind].shape[1]
        for k, name in enumerate(names):
            block = coefficients[name][kind]
            positions = np.arange(n_layers) + (k - (len(names) - 1) / 2) * width
            parts = ax.boxplot([block[:, c] for c in range(n_layers)], positions=positions, widths=width * 0.9,
                               whis=(5, 95), showfliers=False, patch_artist=True)
            for box in parts["boxes"]:
                box.set(facecolor=COLOURS.get(name, "grey"), alpha=0.5)
            ax.plot([], [], color=COLOURS.get(name, "grey"), lw=6, alpha=0.5, label=name)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(n_layers), [str(c) for c in range(n_layers)])
        symbol = "alpha (per edge)" if kind == "edge" else "beta (per node)"
        ax.set(xlabel=f"{'message' if kind == 'edge' else 'update'} layer", ylabel=symbol)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_plots(
    out_dir: str | Path,
    preds: dict[str, Predictions],
    calibration: dict | None = None,
    coefficients: dict[str, dict[str, np.ndarray] | None] | None = None,
) -> list[str]:
    """Write ``energy_parity.png``, ``forces_parity.png`` and, for models with uncertainty,
    ``calibration_curve.png`` and ``error_vs_std.png`` (log axes) into ``out_dir``; for a BLIP
    model also ``coefficients.png`` (alpha and beta per layer, ID and OOD).

    Args:
        preds: ``{"id": Predictions, "ood": Predictions}`` (``ood`` optional).
        calibration: the checkpoint's calibration, applied to the variances.
        coefficients: ``{"id": {"edge": ..., "node": ...}, ...}`` from
            :func:`~blip_ase.uq.coefficients.collect_coefficients` (None entries: no network).

    Returns:
        The written file names.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    out_dir = Path(out_dir)
    factors = variance_factors(calibration or {})
    written = []
    for key, unit in (("energy", "eV"), ("forces", "eV/Å")):
        fig = Figure(figsize=(4.2, 4))
        ax = fig.subplots()
        for name, pred in preds.items():
            true, predicted = getattr(pred, f"{key}_true").ravel(), getattr(pred, f"{key}_pred").ravel()
            mae = m.mae(true - predicted)
            _parity(ax, true, predicted, COLOURS.get(name, "k"), f"{name} (MAE {mae:.3g} {unit})")
        _diagonal(ax)
        ax.set(xlabel=f"reference {key} [{unit}]", ylabel=f"predicted {key} [{unit}]")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{key}_parity.png", dpi=120)
        written.append(f"{key}_parity.png")
    if not all(p.has_uncertainty for p in preds.values()):
        return written

    fig = Figure(figsize=(4.2, 4))
    ax = fig.subplots()
    iso = (calibration or {}).get("forces_isotonic")
    power = (calibration or {}).get("forces_power")
    for name, pred in preds.items():
        err = pred.forces_error.ravel()
        p, p_obs = m.calibration_curve(err, pred.component_variance(factors["forces"], power=power))
        ece = m.expected_calibration_error(err, pred.component_variance(factors["forces"], power=power))
        ax.plot(p, p_obs, color=COLOURS.get(name, "k"), label=f"{name} (ECE {ece:.3f})")
        if iso is not None:
            scaled = pred.component_variance(float((calibration or {}).get("forces", 1.0)), power=power)
            p, p_obs = m.calibration_curve(err, scaled, cdf_map=lambda u: apply_isotonic(u, iso))
            ax.plot(p, p_obs, ":", color=COLOURS.get(name, "k"), label=f"{name}, isotonic")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="expected fraction p", ylabel="observed fraction with Φ(z) ≤ p", title="force calibration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "calibration_curve.png", dpi=120)
    written.append("calibration_curve.png")

    fig = Figure(figsize=(4.2, 4))
    ax = fig.subplots()
    for name, pred in preds.items():
        std = np.sqrt(pred.component_variance(factors["forces"], power=power)[::3])  # component sigma, eV/A
        err = np.sqrt(np.square(pred.forces_error).sum(axis=-1) / 3.0)  # RMS component error per atom
        ax.scatter(std, err, s=6, alpha=0.6, color=COLOURS.get(name, "k"), label=name, edgecolors="none")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _diagonal(ax)
    ax.set(xlabel="predicted force std per component [eV/Å]", ylabel="RMS force error per component [eV/Å]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "error_vs_std.png", dpi=120)
    written.append("error_vs_std.png")
    if coefficients and all(c is not None for c in coefficients.values()):
        plot_coefficients(out_dir / "coefficients.png", coefficients)
        written.append("coefficients.png")
    return written
