"""Fitting LLPR (last-layer prediction rigidity) post hoc on a deterministic model: ``blip llpr``.

What is fitted (see :mod:`blip_ase.inference.llpr` for how it is used):

1. Covariance of the last-layer features on the training set, one row per label, each row
   weighted by the inverse of its label's noise variance (a Gaussian likelihood, as in the
   Laplace approximation LLPR is):

   ``C = w_E sum_s (f_s / n_s)(f_s / n_s)^T + w_F sum_s sum_(k, c) J_skc J_skc^T``

   with ``f_s (D,)`` structure s's features, ``n_s`` its atom count (energy per atom, as
   metatrain's LLPR), ``J_skc = d f_s / d r_kc`` the feature Jacobian of force component
   ``(k, c)``, ``w_E = 1 / mean((E - E_hat)^2 / n^2)`` and ``w_F = 1 / mean((F - F_hat)^2)`` the
   inverse mean squared training residuals (per-atom energy, eV^-2; force component, (eV/A)^-2).
2. ``Sigma = (C + sigma^2 I)^-1``: ``sigma^2 = lambda * trace(C) / D`` with ``lambda`` chosen on the
   validation set from :data:`REGULARIZERS` (or given), for each ``lambda`` the scale ``alpha^2``
   in closed form (the Gaussian NLL optimum over force components, as ``blip calibrate``'s
   variance scale: ``alpha^2 = mean(err^2 / var)``, per-component variance = per-atom trace / 3),
   keeping the pair of lowest validation force NLL.

Everything stored is plain data: ``Sigma`` as nested lists (float64), ``scale = alpha^2``,
``n_features = D`` and how it was fitted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blip_ase.inference.llpr import feature_jacobians, validate_llpr
from blip_ase.uq.calibration import MIN_STRUCTURES, fit_variance_scale

REGULARIZERS = tuple(10.0 ** np.arange(-10.0, 0.5, 1.0))
"""Candidate ``lambda`` (``sigma^2 = lambda * trace(C) / D``), chosen on validation data."""
BATCH_ATOMS = 1024
"""Atoms per batched pass when computing features and Jacobians."""


def last_layer_rows(model: Any, frames: list) -> dict[str, np.ndarray]:
    """Features, Jacobians and the MAP prediction they imply, for every frame.

    Args:
        model: a deterministic potential with last-layer features (PaiNN).
        frames: structures (``ase.Atoms``).

    Returns:
        ``features (F, D)``; ``jacobians (sum n, 3, D)`` (``d f / d r``, per A);
        ``n_atoms (F,)``. Float64 numpy.

    Raises:
        ValueError: the backend gives no last-layer features (LLPR is implemented for PaiNN).
    """
    features, jacobians, start = [], [], 0
    sizes = [len(a) for a in frames]
    while start < len(frames):
        stop, total = start, 0
        while stop < len(frames) and (stop == start or total + sizes[stop] <= BATCH_ATOMS):
            total += sizes[stop]
            stop += 1
        batch = frames[start:stop]
        graph = model.build_graph(batch[0]) if len(batch) == 1 else model.build_batch(batch)
        try:
            f, jac, _ = feature_jacobians(model, graph)
        except NotImplementedError as exc:
            raise ValueError(str(exc)) from None
        features.append(f.cpu().double().numpy())
        jacobians.append(jac.cpu().double().numpy())
        start = stop
    return {"features": np.concatenate(features), "jacobians": np.concatenate(jacobians),
            "n_atoms": np.array(sizes)}  # fmt: skip


def last_layer_weights(model: Any) -> np.ndarray:
    """``(D,)`` the weights ``w`` that multiply the last-layer features (PaiNN's final readout Linear)."""
    return model.net.readout[-1].weight.detach().cpu().double().numpy()[0]


def covariance(rows: dict[str, np.ndarray], energy_weight: float, forces_weight: float) -> np.ndarray:
    """``(D, D)`` the weighted covariance ``C`` of the module docstring (energy rows per atom)."""
    per_atom = rows["features"] / rows["n_atoms"][:, None]
    jac = rows["jacobians"].reshape(-1, rows["jacobians"].shape[-1])
    return energy_weight * per_atom.T @ per_atom + forces_weight * jac.T @ jac


def force_nll(errors: np.ndarray, atom_variance: np.ndarray) -> float:
    """Mean Gaussian NLL (nats) of force components ``errors (N, 3)`` with per-atom traces ``(N,)``."""
    var = np.repeat(atom_variance / 3.0, 3)
    return float(0.5 * np.mean(np.log(2 * np.pi * var) + errors.ravel() ** 2 / var))


def fit_llpr(
    model: Any, train: tuple[list, list[dict]], val: tuple[list, list[dict]], *, regularizer: float | None = None
) -> dict[str, Any]:
    """The LLPR data of ``model`` (see the module docstring), ready for ``model.llpr``.

    Args:
        model: a deterministic PaiNN potential.
        train, val: ``(frames, labels)`` with ``labels[k]["energy"]`` eV and ``["forces"] (n, 3)`` eV/A.
        regularizer: a fixed ``lambda``; None chooses it from :data:`REGULARIZERS` on ``val``.

    Returns:
        ``inverse_covariance`` (D x D lists), ``n_features``, ``scale`` (alpha^2),
        ``regularizer`` (lambda), ``sigma2``, ``energy_weight``, ``forces_weight``,
        ``val_forces_nll``, ``n_train``, ``n_val``.

    Raises:
        ValueError: a model that is not deterministic, no last-layer features, too few
            validation structures, or a non-positive ``regularizer``.
    """
    if model.is_bayesian or model.llpr is not None:
        kind = "an LLPR" if model.llpr is not None else "a Bayesian (or ensemble)"
        raise ValueError(f"LLPR is fitted post hoc on a deterministic model; this is {kind} model")
    if regularizer is not None and not regularizer > 0:
        raise ValueError(f"the LLPR regularizer must be positive, got {regularizer}")
    if len(val[0]) < MIN_STRUCTURES:
        raise ValueError(f"the validation set has {len(val[0])} structures; LLPR's scale needs >= {MIN_STRUCTURES}")
    w = last_layer_weights(model)
    rows = {name: last_layer_rows(model, frames) for name, (frames, _) in (("train", train), ("val", val))}
    errors = {}
    for name, (frames, labels) in (("train", train), ("val", val)):
        r = rows[name]
        forces_pred = -np.einsum("ncd,d->nc", r["jacobians"], w)
        errors[name] = np.concatenate([lab["forces"] for lab in labels]) - forces_pred
    energy_res = _energy_residuals(model, train[0], train[1]) / rows["train"]["n_atoms"]
    energy_weight = 1.0 / max(float(np.mean(energy_res**2)), 1e-12)
    forces_weight = 1.0 / max(float(np.mean(errors["train"] ** 2)), 1e-12)
    c = covariance(rows["train"], energy_weight, forces_weight)
    eigval, eigvec = np.linalg.eigh(c)
    eigval = np.clip(eigval, 0.0, None)
    mean_eig = max(float(eigval.mean()), 1e-300)
    projected = np.einsum("ncd,de->nce", rows["val"]["jacobians"], eigvec) ** 2  # (N, 3, D)
    best = None
    for lam in (regularizer,) if regularizer is not None else REGULARIZERS:
        atom_var = (projected / (eigval + lam * mean_eig)).sum(axis=(1, 2))
        alpha2 = fit_variance_scale(errors["val"], np.repeat(atom_var / 3.0, 3))
        nll = force_nll(errors["val"], alpha2 * atom_var)
        if best is None or nll < best[0]:
            best = (nll, lam, alpha2)
    nll, lam, alpha2 = best
    sigma2 = lam * mean_eig
    inverse = (eigvec / (eigval + sigma2)) @ eigvec.T
    inverse = 0.5 * (inverse + inverse.T)
    data = {
        "inverse_covariance": inverse.tolist(), "n_features": len(w), "scale": float(alpha2),
        "regularizer": float(lam), "sigma2": float(sigma2), "energy_weight": energy_weight,
        "forces_weight": forces_weight, "val_forces_nll": nll, "n_train": len(train[0]), "n_val": len(val[0]),
    }  # fmt: skip
    return validate_llpr(data)


def _energy_residuals(model: Any, frames: list, labels: list[dict]) -> np.ndarray:
    """``(F,)`` reference minus MAP energies, eV."""
    from blip_ase.inference import MonteCarloEngine

    engine = MonteCarloEngine(model, device=model.device, calibration={})
    predicted = np.array([r["energy"] for r in engine.map(engine.prepare(frames), stress=False)])
    return np.array([lab["energy"] for lab in labels]) - predicted


def llpr_checkpoint(
    model_path: str | Path,
    train_path: str | Path,
    val_path: str | Path,
    out_path: str | Path,
    *,
    regularizer: float | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fit LLPR on a deterministic checkpoint and write it with the LLPR data (``blip llpr``).

    The output keeps the weights and training metadata, resets the calibration to scales of 1
    (``alpha^2`` is LLPR's own scale; ``blip calibrate`` may add scales on top) and records
    the fit under ``training["llpr_fit"]``.

    Returns:
        The fit summary: the stored scalars (not the matrix) and the data paths.

    Raises:
        ValueError: see :func:`fit_llpr`; data without energies or forces.
        FileExistsError: ``out_path`` is the input, or exists and ``overwrite`` is False.
    """
    from blip_ase.models.checkpoint import load_checkpoint, save_checkpoint
    from blip_ase.uq.evaluate import read_labelled

    if Path(out_path).resolve() == Path(model_path).resolve():
        raise FileExistsError(f"refusing to overwrite the input checkpoint {model_path}; choose another --out")
    if Path(out_path).exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass --overwrite to replace it")
    model, ckpt = load_checkpoint(model_path, device=device or "cpu")
    if model.is_bayesian or model.llpr is not None:
        fit_llpr(model, ([], []), ([], []))  # raises the refusal before any data is read
    train = read_labelled(train_path, what="LLPR training data")
    val = read_labelled(val_path, what="LLPR validation data")
    data = fit_llpr(model, train, val, regularizer=regularizer)
    model.llpr = data
    summary = {k: v for k, v in data.items() if k != "inverse_covariance"}
    summary |= {"train": str(train_path), "val": str(val_path)}
    training = dict(ckpt.get("training") or {}) | {"llpr_fit": summary}
    save_checkpoint(out_path, model.cpu(), training=training)
    return summary
