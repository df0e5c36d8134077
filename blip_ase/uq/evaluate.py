"""Library behind ``blip eval`` and ``blip calibrate``.

Predictions go through the inference engine (:class:`~blip_ase.inference.MonteCarloEngine`, the
calculator's) for every kind of model, many structures per batched pass, so BLIP, MC dropout,
deep ensembles and deterministic models share one code path: Monte Carlo (``n_samples``,
``seed``) for the stochastic ones, MAP (accuracy only) for a deterministic model. Variances are
predicted without calibration and the checkpoint's calibration is applied afterwards, so one
pass gives the metrics before and after calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from blip_ase.inference.calibration import QUANTITIES, apply_isotonic, structure_means, variance_factors
from blip_ase.strict_json import write_json
from blip_ase.uq import metrics as m
from blip_ase.uq.calibration import (
    MIN_STRUCTURES,
    fit_isotonic,
    fit_power_law,
    fit_variance_scale,
    force_reference,
)
from blip_ase.uq.coefficients import collect_coefficients, summarise_coefficients
from blip_ase.uq.predictions import Predictions

Method = Literal["blip", "mc_dropout", "ensemble", "deterministic", "llpr"]
UQ_KEYS = ("forces_ece", "forces_nll", "forces_crps", "forces_sharpness", "spearman", "energy_nll", "energy_crps")


def model_method(model: Any) -> Method:
    """Which uncertainty method a loaded model uses (``"llpr"``: a deterministic model with LLPR
    data from ``blip llpr``, closed-form variances)."""
    if getattr(model, "llpr", None) is not None:
        return "llpr"
    if model.backend == "ensemble":
        return "ensemble"
    if model.bayes is None:
        return "deterministic"
    return getattr(model.bayes, "method", "blip")


def read_labelled(path: str | Path, *, what: str = "evaluation data") -> tuple[list, list[dict]]:
    """Frames of ``path`` with their reference labels.

    Raises:
        ValueError: a frame lacks energy or forces (the message names the file and frame).
    """
    from blip_ase.data.readers import frame_labels, read_frames

    frames = read_frames(path)
    labels = []
    for k, atoms in enumerate(frames):
        try:
            labels.append(frame_labels(atoms, where=f"{what} {path} frame {k}"))
        except ValueError as exc:
            raise ValueError(f"{exc}: blip eval and blip calibrate need reference energies and forces") from exc
    return frames, labels


PREDICT_BATCH_ATOMS = 4096
"""Atoms per batched pass of :func:`predict` (samples times atoms of the structures in a batch)."""


def structure_generator(seed: int, index: int) -> torch.Generator:
    """The noise generator of structure ``index`` of a data set predicted with ``seed``: its
    samples do not depend on which structures share its batch."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _batches(sizes: list[int], per_structure: int, budget: int) -> list[range]:
    """Consecutive index ranges whose ``sum(sizes) * per_structure`` stays within ``budget``
    (a structure that alone exceeds it is a batch of its own)."""
    batches, start, total = [], 0, 0
    for k, n in enumerate(sizes):
        if k > start and (total + n) * per_structure > budget:
            batches.append(range(start, k))
            start, total = k, 0
        total += n
    if sizes:
        batches.append(range(start, len(sizes)))
    return batches


def predict(
    model: Any,
    frames: list,
    labels: list[dict],
    *,
    n_samples: int = 100,
    seed: int = 0,
    device: str | None = None,
    progress: str | None = None,
) -> Predictions:
    """Predict every frame with the inference engine (no calibration applied).

    Stochastic models take ``n_samples`` Monte Carlo samples (an ensemble: its number of members,
    sample = member), structure ``k`` seeded by :func:`structure_generator` ``(seed, k)``;
    deterministic ones one MAP pass. Structures are batched, :data:`PREDICT_BATCH_ATOMS` atoms
    (samples times atoms) per pass. ``progress``: label of a progress bar on stderr (None: no bar).
    """
    from ase import Atoms
    from tqdm.auto import tqdm

    from blip_ase.inference import MonteCarloEngine

    mc = model_method(model) != "deterministic"
    engine = MonteCarloEngine(model, device=device, seed=seed, calibration={})
    engine.max_batch_atoms = max(engine.max_batch_atoms, PREDICT_BATCH_ATOMS)
    per_structure = engine.samples_per_check(n_samples) if mc and model_method(model) != "llpr" else 1
    results: list[dict] = []
    with tqdm(total=len(frames), desc=progress, unit="structure", disable=progress is None, dynamic_ncols=True) as bar:
        for batch in _batches([len(a) for a in frames], per_structure, PREDICT_BATCH_ATOMS):
            bare = [Atoms(frames[k].numbers, frames[k].positions, cell=frames[k].cell, pbc=frames[k].pbc) for k in batch]
            prepared = engine.prepare(bare)
            if mc:
                generators = [structure_generator(seed, k) for k in batch]
                results += engine.monte_carlo(prepared, n_samples, generators=generators, stress=False)
            else:
                results += engine.map(prepared, stress=False)
            bar.update(len(batch))
    return Predictions(
        energy_true=np.array([lab["energy"] for lab in labels]),
        energy_pred=np.array([r["energy"] for r in results]),
        forces_true=np.concatenate([lab["forces"] for lab in labels]),
        forces_pred=np.concatenate([r["forces"] for r in results]),
        n_atoms=np.array([len(a) for a in frames]),
        energy_variance=np.array([r["energy_variance"] for r in results]) if mc else None,
        forces_variance=np.concatenate([r["forces_variance"] for r in results]) if mc else None,
        numbers=np.concatenate([a.numbers for a in frames]),
    )


def compute_metrics(pred: Predictions, calibration: dict | None = None) -> dict[str, float | int | None]:
    """Accuracy and uncertainty metrics of ``pred`` (definitions in :mod:`blip_ase.uq.metrics`).

    Args:
        calibration: checkpoint calibration dict (scales, optional isotonic maps); None = none.

    Returns:
        ``n_structures``, ``energy_mae``, ``energy_rmse`` (eV), ``forces_mae``, ``forces_rmse``
        (eV/A) and the uncertainty keys :data:`UQ_KEYS` (None for a deterministic model):
        ``forces_ece``, ``forces_nll`` (nats per component), ``forces_crps`` (eV/A),
        ``forces_sharpness`` (eV/A), ``spearman``, ``energy_nll``, ``energy_crps`` (eV); with a
        forces isotonic map also ``forces_ece_isotonic`` (ECE of the recalibrated CDF).
    """
    out: dict[str, Any] = {
        "n_structures": int(len(pred.n_atoms)),
        "energy_mae": m.mae(pred.energy_error),
        "energy_rmse": m.rmse(pred.energy_error),
        "forces_mae": m.mae(pred.forces_error),
        "forces_rmse": m.rmse(pred.forces_error),
        **dict.fromkeys(UQ_KEYS),
    }
    if not pred.has_uncertainty:
        return out
    calibration = calibration or {}
    factors = variance_factors(calibration)
    power = calibration.get("forces_power")
    f_err, f_var = pred.forces_error.ravel(), pred.component_variance(factors["forces"], power=power)
    e_var = factors["energy"] * pred.energy_variance
    out.update(
        forces_ece=m.expected_calibration_error(f_err, f_var),
        forces_nll=m.gaussian_nll(f_err, f_var),
        forces_crps=m.gaussian_crps(f_err, f_var),
        forces_sharpness=m.sharpness(f_var),
        spearman=m.spearman(pred.forces_error, pred.forces_variance, pred.n_atoms),
        energy_nll=m.gaussian_nll(pred.energy_error, e_var),
        energy_crps=m.gaussian_crps(pred.energy_error, e_var),
    )
    iso = calibration.get("forces_isotonic")
    if iso is not None:
        scaled = pred.component_variance(calibration.get("forces", 1.0), power=power)
        recalibrate = lambda u: apply_isotonic(u, iso)  # noqa: E731
        out["forces_ece_isotonic"] = m.expected_calibration_error(f_err, scaled, cdf_map=recalibrate)
    return out


def structure_uncertainty(pred: Predictions, reduce: Literal["mean", "max"] = "mean") -> np.ndarray:
    """``(F,)`` per-structure mean (or max) of the per-atom force std ``sqrt(v_i)``, eV/A."""
    std = np.sqrt(pred.forces_variance)
    return m.per_structure_mean(std, pred.n_atoms) if reduce == "mean" else m.per_structure_max(std, pred.n_atoms)


def is_identity(calibration: dict | None) -> bool:
    """True when ``calibration`` changes nothing (all scales 1, no isotonic map)."""
    calibration = calibration or {}
    scales = all(float(calibration.get(q, 1.0)) == 1.0 for q in QUANTITIES)
    maps = ("_isotonic", "_power")
    return scales and not any(k.endswith(maps) and v is not None for k, v in calibration.items())


EVAL_OUTPUTS = (
    "metrics.json", "energy_parity.png", "forces_parity.png", "calibration_curve.png", "error_vs_std.png",
    "coefficients.png",
)


def check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that is a file, or holds files while ``overwrite`` is False.

    Raises:
        FileExistsError: naming the directory and ``--overwrite``.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; pass --overwrite to replace its results")


def evaluate(
    model_path: str | Path,
    data_path: str | Path,
    *,
    ood_path: str | Path | None = None,
    n_samples: int = 100,
    seed: int = 0,
    device: str | None = None,
    out_dir: str | Path | None = None,
    plots: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Metrics of the checkpoint at ``model_path`` on ``data_path`` (section ``id``) and, with
    ``ood_path``, on out-of-distribution data (section ``ood``, top-level ``auroc``).

    Sections ``id``/``ood`` use the checkpoint's calibration, as the calculator reports it;
    when that calibration is not the identity, ``id_uncalibrated``/``ood_uncalibrated`` hold the
    metrics before it. With ``out_dir``: writes ``metrics.json`` and (``plots``) PNG plots there;
    an ``out_dir`` that holds files is refused unless ``overwrite`` (then this command's earlier
    outputs there are deleted first, so old plots never sit beside new metrics). ``progress``
    shows a progress bar per data set on stderr.

    Returns:
        The ``metrics.json`` dict.

    Raises:
        FileExistsError: ``out_dir`` holds files and ``overwrite`` is False (checked first).
    """
    from blip_ase.models.checkpoint import load_checkpoint

    if out_dir is not None:
        check_output_dir(Path(out_dir), overwrite=overwrite)
    model, ckpt = load_checkpoint(model_path, device=device or "cpu")
    calibration = ckpt.get("calibration") or {}
    method = model_method(model)
    sets = {"id": data_path} | ({"ood": ood_path} if ood_path is not None else {})
    labelled = {name: read_labelled(path) for name, path in sets.items()}  # read once: predictions, alpha/beta
    preds = {name: predict(model, frames, labels, n_samples=n_samples, seed=seed, device=device,
                           progress=f"predict {name}" if progress else None)
             for name, (frames, labels) in labelled.items()}
    report: dict[str, Any] = {
        "model": str(model_path),
        "method": method,
        "n_samples": None if method in ("deterministic", "llpr") else (model.n_members if method == "ensemble" else n_samples),
        "seed": seed,
        "units": {"energy": "eV", "forces": "eV/A", "nll": "nats per value"},
        "data": {name: str(path) for name, path in sets.items()},
        "calibration": {k: (v if not k.endswith("_isotonic") else "isotonic map") for k, v in calibration.items()},
    }
    for name, pred in preds.items():
        report[name] = compute_metrics(pred, calibration)
        if not is_identity(calibration):
            report[f"{name}_uncalibrated"] = compute_metrics(pred, None)
    coefficients = {name: collect_coefficients(model, frames) for name, (frames, _) in labelled.items()}
    report["coefficients"] = None
    if coefficients["id"] is not None:
        report["coefficients"] = {name: summarise_coefficients(c) for name, c in coefficients.items()}
    report["auroc"] = report["auroc_max"] = None
    if "ood" in preds and preds["id"].has_uncertainty:
        for key, reduce in (("auroc", "mean"), ("auroc_max", "max")):
            scores = [structure_uncertainty(preds[s], reduce) for s in ("id", "ood")]
            report[key] = m.auroc(*scores)
    if out_dir is not None:
        out_dir = Path(out_dir)
        for name in EVAL_OUTPUTS:  # with overwrite: this command's earlier outputs
            (out_dir / name).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "metrics.json", report)
        if plots:
            from blip_ase.uq.plots import write_plots

            report["plots"] = write_plots(out_dir, preds, calibration, coefficients)
    return report


def fit_calibration(pred: Predictions, *, isotonic: bool = False, power: bool = False, structure: bool = False) -> dict:
    """Variance scales (and optionally isotonic maps and the forces' power-law map, with
    ``structure`` also its structure term) fitted to ``pred`` (see :mod:`blip_ase.uq.calibration`).

    Raises:
        ValueError: fewer than :data:`MIN_STRUCTURES` structures, a deterministic model, or
            ``structure`` without ``power``.
    """
    if structure and not power:
        raise ValueError("the structure term is part of the power-law map: structure calibration needs power")
    if len(pred.n_atoms) < MIN_STRUCTURES:
        raise ValueError(
            f"the calibration set has {len(pred.n_atoms)} structures; at least {MIN_STRUCTURES} are needed"
        )
    if not pred.has_uncertainty:
        raise ValueError("a deterministic model has no variances to calibrate")
    f_err = pred.forces_error.ravel()
    calibration: dict[str, Any] = {
        "energy": fit_variance_scale(pred.energy_error, pred.energy_variance),
        "forces": fit_variance_scale(f_err, pred.component_variance()),
        "stress": 1.0,
    }
    if power:  # fitted on component variances v / 3; the map acts on the per-atom trace v
        means = np.repeat(structure_means(pred.forces_variance, pred.n_atoms) / 3.0, 3) if structure else None
        calibration["forces"], forces_power = fit_power_law(f_err, pred.component_variance(), means)
        calibration["forces_power"] = forces_power | {
            k: 3.0 * forces_power[k] for k in ("reference", "structure_reference") if k in forces_power
        }
    if isotonic:
        calibration["energy_isotonic"] = fit_isotonic(pred.energy_error, calibration["energy"] * pred.energy_variance)
        scaled = pred.component_variance(calibration["forces"], power=calibration.get("forces_power"))
        calibration["forces_isotonic"] = fit_isotonic(f_err, scaled)
    return calibration


def fit_uncertainty_screen(model: Any, frames: list, *, n_samples: int, seed: int, device: str | None) -> Any:
    """The uncertainty screen of a BLIP model (:mod:`blip_ase.inference.screen`), fitted on
    ``frames`` and their rattled copies: features from alpha/beta and the MAP forces, targets the Monte Carlo
    per-atom force stds (uncalibrated; the engine applies the calibration when it screens)."""
    from blip_ase.inference import MonteCarloEngine
    from blip_ase.inference.screen import atom_features, fit_screen, rattled_copies

    engine = MonteCarloEngine(model, device=device, seed=seed, calibration={})
    features, stds = [], []
    for k, atoms in enumerate(rattled_copies(frames, seed=seed)):
        prepared = engine.prepare(atoms)
        stats = engine.monte_carlo(prepared, n_samples, generators=[structure_generator(seed, k)], stress=False)[0]
        forces = engine.map(prepared, stress=False)[0]["forces"]
        with torch.no_grad():
            inputs = model.posterior_inputs(prepared.graph)
            coefficients = model.coefficients(prepared.graph, jacobian=False)
        features.append(atom_features(coefficients, inputs, forces, len(model.elements)))
        stds.append(np.sqrt(stats["forces_variance"]))
    return fit_screen(features, stds, n_elements=len(model.elements))


def calibrate(
    model_path: str | Path,
    data_path: str | Path | Sequence[str | Path],
    out_path: str | Path,
    *,
    isotonic: bool = False,
    power: bool = False,
    structure: bool = False,
    n_samples: int = 100,
    seed: int = 0,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    screen_fit: bool = True,
) -> dict:
    """Fit calibration on the validation set ``data_path`` and write the calibrated checkpoint.

    ``data_path`` may be several files, fitted as one set: the validation split together with
    labelled frames from hotter MD or from ``blip learn`` rounds, so that the fit also sees the
    large variances of structures away from the training data (docs/method.md, calibration).
    The fit starts from the uncalibrated variances (any calibration already in the checkpoint
    is replaced). ``power``: also fit the power-law map of the force variances
    (:func:`~blip_ase.uq.calibration.fit_power_law`); ``structure``: with ``power``, the map's
    structure term too. For a BLIP model (``screen_fit``) the cheap uncertainty screen is fitted too
    (:func:`fit_uncertainty_screen`). Everything else in the checkpoint is kept.

    Returns:
        ``{"calibration": scales (isotonic maps summarised), "reference": the force error and
        calibrated std quantiles stored in the checkpoint (:func:`~blip_ase.uq.calibration.force_reference`),
        "before": metrics, "after": metrics}`` on the calibration set.

    Raises:
        ValueError: fewer than 5 structures, data without forces, a deterministic model.
        FileExistsError: ``out_path`` is the input checkpoint, or exists and ``overwrite`` is False.
    """
    from blip_ase.models.checkpoint import load_checkpoint, save_checkpoint

    if structure and not power:
        raise ValueError("the structure term is part of the power-law map: --structure needs --power")
    if Path(out_path).resolve() == Path(model_path).resolve():
        raise FileExistsError(f"refusing to overwrite the input checkpoint {model_path}; choose another --out")
    if Path(out_path).exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass --overwrite to replace it")
    paths = [data_path] if isinstance(data_path, (str, Path)) else list(data_path)
    if not paths:
        raise ValueError("no calibration data given")
    frames, labels = [], []
    for path in paths:  # every file read (and checked) before the model is loaded
        f, lab = read_labelled(path, what="calibration data")
        frames, labels = frames + f, labels + lab
    data_path = " + ".join(map(str, paths))
    if len(frames) < MIN_STRUCTURES:
        raise ValueError(
            f"the calibration set {data_path} has {len(frames)} structures; at least {MIN_STRUCTURES} are needed"
        )
    model, ckpt = load_checkpoint(model_path, device=device or "cpu")
    if model_method(model) == "deterministic":
        raise ValueError("a deterministic model has no variances to calibrate")
    pred = predict(model, frames, labels, n_samples=n_samples, seed=seed, device=device,
                   progress="predict" if progress else None)
    calibration = fit_calibration(pred, isotonic=isotonic, power=power, structure=structure)
    reference = {"data": str(data_path), **force_reference(pred, calibration)}
    screen = None
    if screen_fit and model_method(model) == "blip":
        screen = fit_uncertainty_screen(model, frames, n_samples=n_samples, seed=seed, device=device).to_dict()
    training = dict(ckpt.get("training") or {})
    used = {"ensemble": getattr(model, "n_members", None), "llpr": None}.get(model_method(model), n_samples)
    training["calibration_fit"] = {"data": str(data_path), "n_structures": len(frames), "n_samples": used,
                                   "seed": seed, "isotonic": isotonic, "power": power, "structure": structure}
    save_checkpoint(out_path, model.cpu(), calibration=calibration, training=training, reference=reference,
                    screen=screen)  # fmt: skip
    summary = {k: (v if not k.endswith("_isotonic") else f"{len(v['x'])} knots") for k, v in calibration.items()}
    return {
        "calibration": summary,
        "reference": reference,
        "screen": screen,
        "before": compute_metrics(pred),
        "after": compute_metrics(pred, calibration),
    }
