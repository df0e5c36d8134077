"""LLPR: closed-form variances of a deterministic model from its last-layer features.

Last-layer prediction rigidity (Bigi, Chong, Ceriotti, Grasselli 2024): the model's energy is
linear in its last layer's weights ``w``, ``E = w . f + c`` with ``f (D,)`` the structure's
last-layer features (:meth:`~blip_ase.models.potential.Potential.last_layer_features`). A
Gaussian (Laplace) posterior on ``w`` with covariance ``alpha^2 Sigma``, where
``Sigma = (C + sigma^2 I)^-1`` and ``C`` sums the training set's feature rows (``blip llpr``,
:mod:`blip_ase.uq.llpr`), gives every prediction that is linear in ``w`` a variance in closed form:

- energy: ``alpha^2 f^T Sigma f`` (eV^2);
- force component ``(k, c)``: ``alpha^2 J_kc^T Sigma J_kc`` with ``J_kc = d f / d r_kc``; the
  per-atom ``forces_variance`` is the trace, the sum over ``c`` (eV^2/A^2);
- stress (periodic cells): the same with the Jacobian of ``f`` with respect to the strain,
  symmetrised and divided by the volume, per Voigt component ((eV/A^3)^2).

The energy, forces and stress reported are the deterministic (MAP) prediction; there are no
samples (``n_samples`` and seeds are irrelevant, ``keep_samples`` adds nothing). The engine calls
:func:`llpr_statistics` when its model carries LLPR data (``model.llpr``, stored in the
checkpoint under ``llpr``):

``{"inverse_covariance": (D, D) nested lists = Sigma, "n_features": D, "scale": alpha^2, ...}``
(other keys: how it was fitted, ignored here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from blip_ase.inference.calibration import apply_power
from blip_ase.voigt import matrix_to_voigt

LLPR_REQUIRED = ("inverse_covariance", "n_features", "scale")


def validate_llpr(data: Mapping[str, Any]) -> dict[str, Any]:
    """The LLPR dict checked: ``inverse_covariance`` a finite symmetric ``(D, D)`` matrix with
    ``D = n_features``, ``scale`` a positive finite float.

    Raises:
        TypeError: not a mapping.
        ValueError: naming the first problem.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"LLPR data must be a dict, got {type(data).__name__}")
    missing = [k for k in LLPR_REQUIRED if k not in data]
    if missing:
        raise ValueError(f"LLPR data lacks the keys {missing}")
    sigma = np.asarray(data["inverse_covariance"], dtype=float)
    d = data["n_features"]
    if isinstance(d, bool) or not isinstance(d, int) or d < 1 or sigma.shape != (d, d):
        raise ValueError(f"LLPR inverse_covariance has shape {sigma.shape}, n_features {d!r}: need (D, D), D >= 1")
    if not np.isfinite(sigma).all() or not np.allclose(sigma, sigma.T, rtol=1e-6, atol=0.0):
        raise ValueError("LLPR inverse_covariance must be finite and symmetric")
    scale = float(data["scale"])
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"LLPR scale (alpha^2) must be positive and finite, got {scale}")
    return dict(data)


def feature_jacobians(model: Any, graph: Any, *, stress: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Last-layer features of a batch and their Jacobians, one backward pass per feature.

    Args:
        model: a :class:`~blip_ase.models.potential.Potential` with ``last_layer_features``.
        graph: its batched graph of ``G`` structures, ``N`` atoms.
        stress: also the Jacobian with respect to the strain (periodic cells).

    Returns:
        ``features (G, D)``; ``d f / d r`` as ``(N, 3, D)`` (A^-1 times the features' unit);
        ``d f / d strain`` as ``(G, 3, 3, D)`` or None. Detached, on the model's device.

    Raises:
        NotImplementedError: the backend has no last-layer features.
    """
    with torch.enable_grad():
        positions = graph.positions.detach().requires_grad_(True)
        inputs = [positions]
        strain = None
        if stress:
            strain = torch.zeros(graph.n_graphs, 3, 3, dtype=positions.dtype, device=positions.device,
                                 requires_grad=True)  # fmt: skip
            inputs.append(strain)
        features = model.last_layer_features(graph, positions=positions, strain=strain)
        n_features = features.shape[1]
        columns: list[list[torch.Tensor]] = [[] for _ in inputs]
        for d in range(n_features):  # structures are disjoint: d(sum_g f_gd)/dr_k is atom k's own
            grads = torch.autograd.grad(features[:, d].sum(), inputs, retain_graph=d < n_features - 1,
                                        allow_unused=True)  # fmt: skip
            for column, grad, x in zip(columns, grads, inputs):
                column.append(torch.zeros_like(x) if grad is None else grad)
    jac = [torch.stack(column, dim=-1) for column in columns]
    return features.detach(), jac[0], jac[1] if stress else None


def quadratic_form(rows: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``rows^T Sigma rows`` over the last axis: ``(..., D)`` and ``(D, D)`` -> ``(...)``."""
    return torch.einsum("...i,ij,...j->...", rows, sigma, rows)


def llpr_statistics(
    model: Any,
    prepared: Any,
    map_results: Sequence[dict[str, Any]],
    factors: Mapping[str, float],
    *,
    forces_power: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """LLPR results of every structure of a prepared configuration.

    Args:
        model: a deterministic potential with ``model.llpr`` data (see the module docstring).
        prepared: the engine's :class:`~blip_ase.inference.engine.Prepared` configuration
            (``graph``, ``bounds``, ``n_structures``).
        map_results: its MAP results per structure (energy, forces, stress when asked for).
        factors: variance multipliers ``{"energy", "forces", "stress"}`` (the calibration).
        forces_power: the calibration's power-law map of the per-atom force variance
            (:func:`~blip_ase.inference.calibration.apply_power`), applied before the factor.

    Returns:
        Per structure, the MAP results plus ``energy_variance`` eV^2, ``forces_variance (n,)``
        eV^2/A^2 (per-atom trace) and, where the MAP results hold ``stress``,
        ``stress_variance (6,)`` (eV/A^3)^2; all times ``alpha^2`` and the calibration.
    """
    data = validate_llpr(model.llpr)
    with_stress = "stress" in map_results[0]
    features, jac_r, jac_strain = feature_jacobians(model, prepared.graph, stress=with_stress)
    sigma = torch.as_tensor(data["inverse_covariance"], dtype=features.dtype, device=features.device)
    if sigma.shape != (features.shape[1],) * 2:
        raise ValueError(f"LLPR data for {sigma.shape[0]} features, but the model gives {features.shape[1]}")
    alpha2 = float(data["scale"])
    energy_var = alpha2 * quadratic_form(features, sigma).cpu().double().numpy()
    atom_var = alpha2 * quadratic_form(jac_r, sigma).sum(dim=-1).cpu().double().numpy()
    stress_var = None
    if jac_strain is not None:
        volume = torch.linalg.det(prepared.graph.cell).abs()
        sym = 0.5 * (jac_strain + jac_strain.transpose(1, 2)) / volume[:, None, None, None]
        voigt = matrix_to_voigt(sym.movedim(-1, 1)).movedim(1, -1)  # (G, 6, D)
        stress_var = alpha2 * quadratic_form(voigt, sigma).cpu().double().numpy()
    b = prepared.bounds
    out = []
    for g, result in enumerate(map_results):
        result = dict(result)
        result["energy_variance"] = float(energy_var[g]) * factors["energy"]
        result["forces_variance"] = apply_power(atom_var[b[g] : b[g + 1]], forces_power) * factors["forces"]
        if stress_var is not None:
            result["stress_variance"] = stress_var[g] * factors["stress"]
        out.append(result)
    return out
