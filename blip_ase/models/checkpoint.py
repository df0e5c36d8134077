"""Checkpoint files: one ``torch.save`` dict, read with ``torch.load(weights_only=True)``.

Format version 2 holds: ``format_version``, ``backend``, ``config`` (the backend's
``config_dict()``: elements, architecture, Bayesian settings), ``state_dict``, ``elements``,
``reference_energies`` (eV, per element), ``normalisation`` (``scale``),
``calibration`` (variance scale factors ``energy``, ``forces``, ``stress``), ``training``
metadata, ``bayesian_layers`` (the Bayesian linears' names in alpha/beta column order,
``{"edge": [...], "node": [...]}``, checked at load) and ``reference`` (None, or what
``blip calibrate`` measured on its data for thresholds in calibrated units: per-element
quantiles of the force errors and calibrated stds, see :func:`blip_ase.uq.calibration.force_reference`)
and ``screen`` (None, or the cheap uncertainty screen ``blip calibrate`` fitted:
:class:`blip_ase.inference.screen.Screen`) and ``llpr`` (None, or what ``blip llpr`` fitted for
last-layer prediction rigidity variances of a deterministic model, see
:mod:`blip_ase.inference.llpr`; :func:`load_checkpoint` sets it as the model's ``llpr`` and
:func:`save_checkpoint` writes the model's ``llpr``).

History: version 1 had the same keys, but ``bayesian_layers`` was added within it, so a version 1
file may lack it; the upgrade to version 2 stores ``None`` there (layout unknown: not checked)
and ``reference``, ``screen`` and ``llpr`` None, and records ``upgraded_from``. Older versions are upgraded by the functions in ``UPGRADES``; one
file of each earlier format is kept under ``tests/fixtures/`` and must keep loading.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from blip_ase.models.potential import BACKENDS, Potential

FORMAT_VERSION = 2
CALIBRATION_QUANTITIES = ("energy", "forces", "stress")  # the one list of calibration keys
DEFAULT_CALIBRATION = dict.fromkeys(CALIBRATION_QUANTITIES, 1.0)  # variance scale factors
ISOTONIC_KEYS = tuple(f"{q}_isotonic" for q in CALIBRATION_QUANTITIES)  # optional isotonic maps
POWER_KEYS = ("forces_power",)  # optional power-law variance map (forces only)
REQUIRED_KEYS = frozenset({"backend", "config", "state_dict", "elements", "calibration", "bayesian_layers", "reference",
                           "screen", "llpr"})



def _upgrade_1_to_2(ckpt: dict) -> dict:
    """Version 1 -> 2: ``bayesian_layers`` becomes a required key (None: written before the
    layout was stored, so it cannot be checked); ``reference`` is new (None: not measured)."""
    layers = ckpt.get("bayesian_layers")
    return {**ckpt, "format_version": 2, "bayesian_layers": layers, "reference": None, "screen": None,
            "llpr": None, "upgraded_from": 1}


UPGRADES: dict[int, Callable[[dict], dict]] = {1: _upgrade_1_to_2}
"""version -> function upgrading a checkpoint dict of that version to version + 1."""


class CheckpointError(ValueError):
    """The file is not a blip-ase checkpoint this version can read."""


def save_checkpoint(
    path: str | Path,
    model: Potential,
    *,
    calibration: dict[str, float] | None = None,
    training: dict | None = None,
    reference: dict | None = None,
    screen: dict | None = None,
) -> None:
    """Write ``model`` to ``path`` (atomically: a temporary file is renamed into place).

    ``reference``: the calibration set's force error and std quantiles (``blip calibrate``,
    :func:`blip_ase.uq.calibration.force_reference`), for thresholds in calibrated units;
    ``screen``: the fitted uncertainty screen (:class:`blip_ase.inference.screen.Screen` as a dict).
    The model's ``llpr`` data (None for most models) is written under ``llpr``.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "format_version": FORMAT_VERSION,
        "backend": model.backend,
        "config": model.config_dict(),
        "state_dict": state,
        "elements": list(model.elements),
        "reference_energies": state["reference_energies"].tolist() if "reference_energies" in state else None,
        "normalisation": {k: float(state[k]) for k in ("scale",) if k in state},
        "calibration": {**DEFAULT_CALIBRATION, **(calibration or {})},
        "training": training or {},
        "bayesian_layers": model.bayesian_layout(),
        "reference": reference,
        "screen": screen,
        "llpr": model.llpr,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> dict:
    """Load and upgrade the checkpoint dict at ``path`` without building the model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean "not ours"
        raise CheckpointError(_refusal(path, exc)) from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path} is not a blip-ase checkpoint (no 'format_version' key)")
    version = ckpt["format_version"]
    while version in UPGRADES:
        ckpt = UPGRADES[version](ckpt)
        version = ckpt["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this blip-ase reads version {FORMAT_VERSION}"
        )
    missing = sorted(REQUIRED_KEYS - ckpt.keys())
    if missing:
        raise CheckpointError(f"{path} is a damaged checkpoint: format version {version} requires the keys {missing}")
    if ckpt["backend"] not in BACKENDS:
        raise CheckpointError(f"{path} uses unknown backend {ckpt['backend']!r}; known: {sorted(BACKENDS)}")
    return ckpt


def _refusal(path: Path, exc: Exception) -> str:
    """Why ``path`` was refused, in our words: torch's own message suggests ``weights_only=False``,
    which would let the file run code, so it is never passed on."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError) and "Unsupported operand" not in str(exc):
        return (
            f"{path} is not a blip-ase checkpoint: it holds Python objects other than tensors and plain "
            "data (a blip-ase checkpoint never does), and loading it could run code, so it was refused"
        )
    return f"{path} is not a blip-ase checkpoint: not a readable torch.save file ({type(exc).__name__})"


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[Potential, dict]:
    """Build the model stored at ``path``.

    Returns:
        ``(model, checkpoint_dict)``; the model is in eval mode on ``device``.
    """
    ckpt = read_checkpoint(path)
    model = BACKENDS[ckpt["backend"]].from_config(ckpt["config"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the stored architecture: {exc}") from exc
    check_bayesian_layout(path, ckpt.get("bayesian_layers"), model.bayesian_layout())
    model.llpr = ckpt["llpr"]
    model.to(device=device, dtype=ckpt["state_dict"]["scale"].dtype).eval()
    return model, ckpt


def check_bayesian_layout(path: str | Path, stored: dict | None, built: dict[str, list[str]]) -> None:
    """Refuse a model whose Bayesian layers differ from the checkpoint's, in names or order.

    The weights would load (same keys), but alpha/beta column k would drive another layer than
    in training: permuted noise. Checkpoints written before the layout was stored (no key) are
    not checked (``None`` after the upgrade from format version 1).

    Raises:
        CheckpointError: naming the first difference.
    """
    if stored is None:
        return
    for role, kind in (("edge", "alpha"), ("node", "beta")):
        a, b = list(stored.get(role, [])), list(built.get(role, []))
        if a == b:
            continue
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        first = f"column {k}: stored {a[k] if k < len(a) else 'nothing'!r}, built {b[k] if k < len(b) else 'nothing'!r}"
        raise CheckpointError(
            f"{path}: the model built here wraps other {role} layers ({kind} columns) than the checkpoint "
            f"({len(a)} stored, {len(b)} built; first difference at {first}); loading it would apply the "
            "learned noise to the wrong layers (did the backend library change its module names or order?)"
        )
