"""Post-hoc calibration of predicted variances (``blip calibrate``); numpy/scipy only.

Two steps, both fitted on a validation set and stored in ``ckpt["calibration"]`` as plain
floats and lists (so ``torch.load(weights_only=True)`` reads them):

1. Variance scale per quantity: with ``var' = s * var`` the mean Gaussian NLL
   ``0.5 log(2 pi s var) + err^2 / (2 s var)`` is minimised in closed form by
   ``s = mean(err^2 / var)`` (keys ``energy``, ``forces``, ``stress``).
2. Optional isotonic recalibration (Kuleshov, Fenner, Ermon 2018): a monotone map ``R`` from the
   predicted CDF level ``u = Phi(err / sigma')`` (after step 1) to the observed frequency of
   levels ``<= u``, fitted by pool-adjacent-violators; stored as ``{"x": [...], "y": [...]}``
   knots of a piecewise-linear map (keys ``energy_isotonic``, ``forces_isotonic``). The
   recalibrated CDF of the standardised error is ``G(z) = R(Phi(z))``; the calculator reports
   variances multiplied by ``s * E_G[z^2]`` (:func:`isotonic_variance_factor`), the second moment
   about the predicted mean of the recalibrated distribution, and ``blip eval`` also reports the
   ECE of the recalibrated CDF itself.
3. Optional power-law map of the force variances (``blip calibrate --power``), fitted jointly
   with the forces scale (it replaces step 1's forces scale; step 2, if asked for, is fitted
   after it): ``var' = s * v_ref * (var / v_ref) ** gamma``
   (:func:`fit_power_law`, key ``forces_power``). A single scale fitted near the data cannot
   make large predicted variances (structures away from the data) larger in proportion than
   small ones; ``gamma > 1`` does. Applying a stored calibration (validation, variance
   factors, the isotonic map) is the inference engine's: :mod:`blip_ase.inference.calibration`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from blip_ase.inference.calibration import calibrated_forces_variance

if TYPE_CHECKING:
    from blip_ase.uq.predictions import Predictions

MIN_STRUCTURES = 5
REFERENCE_QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)
"""Quantile levels of the reference distributions :func:`force_reference` stores (1.0: the maximum)."""


def fit_variance_scale(error: np.ndarray, variance: np.ndarray) -> float:
    """Closed-form NLL-minimising variance scale ``s = mean(err^2 / var)``.

    Args:
        error: ``(K,)`` true minus predicted; variance: ``(K,)`` predicted variances (>= 0).
            Entries with a variance of exactly zero (an atom with no neighbour within the
            cutoff: zero force and zero force variance, whatever the scale) carry no information
            about the scale and are left out.

    Raises:
        ValueError: no data, a negative or non-finite variance, or no positive variance at all.
    """
    error, variance = np.asarray(error, float).ravel(), np.asarray(variance, float).ravel()
    if error.size == 0 or error.shape != variance.shape:
        raise ValueError(f"need matching non-empty errors and variances, got {error.shape} and {variance.shape}")
    if not (np.isfinite(variance).all() and (variance >= 0).all()):
        raise ValueError("cannot fit a variance scale: some predicted variances are negative or not finite")
    used = variance > 0
    if not used.any():
        raise ValueError("cannot fit a variance scale: every predicted variance is zero")
    return float(np.mean(np.square(error[used]) / variance[used]))


POWER_BOUNDS = (0.25, 4.0)
"""Range of the power-law exponent gamma searched by :func:`fit_power_law`."""


STRUCTURE_BOUNDS = (0.0, 4.0)
"""Range of the structure exponent delta searched by :func:`fit_power_law` (``>= 0``: the map stays
monotone in every variance, so the uncertainty screen's bounds stay bounds)."""


def fit_power_law(
    error: np.ndarray, variance: np.ndarray, structure: np.ndarray | None = None
) -> tuple[float, dict[str, float]]:  # fmt: skip
    """Variance scale and power-law exponent(s) minimising the Gaussian NLL of ``error``.

    The calibrated variance is ``s * v_ref * (var / v_ref) ** gamma`` with ``v_ref`` the median of
    the positive variances (so ``s`` stays the size of a plain scale); for each ``gamma`` the best
    ``s`` is closed form (:func:`fit_variance_scale`), and ``gamma`` is searched in
    :data:`POWER_BOUNDS` (bounded scalar minimisation of the NLL). With ``structure`` the map also
    has the factor ``(m / m_ref) ** delta`` (``m``: the structure mean variance of each entry,
    ``m_ref`` their median) and ``(gamma, delta)`` are searched jointly (L-BFGS-B from ``(1, 0)``,
    delta in :data:`STRUCTURE_BOUNDS`).

    Args:
        error: ``(K,)`` true minus predicted; variance: ``(K,)`` predicted variances (>= 0), in the
            units of the variance the map will be applied to (``v_ref`` is in them).
        structure: ``(K,)`` the mean variance of each entry's structure, in the same units.

    Returns:
        ``(s, {"gamma": gamma, "reference": v_ref})``, with ``structure`` also ``"delta"`` and
        ``"structure_reference"``.

    Raises:
        ValueError: as :func:`fit_variance_scale`.
    """
    from scipy.optimize import minimize, minimize_scalar

    fit_variance_scale(error, variance)  # the same checks
    error, variance = np.asarray(error, float).ravel(), np.asarray(variance, float).ravel()
    used = variance > 0
    error, variance = error[used], variance[used]
    reference = float(np.median(variance))
    log_v = np.log(variance / reference)
    if structure is not None:
        structure = np.asarray(structure, float).ravel()[used]
        structure_reference = float(np.median(structure))
        log_m = np.log(structure / structure_reference)

    def nll(gamma: float, delta: float = 0.0) -> float:
        log_mapped = gamma * log_v + (delta * log_m if delta else 0.0)
        scale = float(np.mean(np.square(error) / (reference * np.exp(log_mapped))))
        return float(np.log(scale) + np.mean(log_mapped))  # the NLL up to constants, at the best scale

    if structure is None:
        gamma = float(minimize_scalar(nll, bounds=POWER_BOUNDS, method="bounded").x)
        power = {"gamma": gamma, "reference": reference}
    else:
        bounds = [POWER_BOUNDS, STRUCTURE_BOUNDS]
        best = minimize(lambda x: nll(*x), np.array([1.0, 0.0]), method="L-BFGS-B", bounds=bounds)
        gamma, delta = map(float, best.x)
        power = {"gamma": gamma, "reference": reference, "delta": delta, "structure_reference": structure_reference}
    mapped = reference * np.exp(gamma * log_v + (power.get("delta", 0.0) * log_m if structure is not None else 0.0))
    return fit_variance_scale(error, mapped), power


def pool_adjacent_violators(y: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Least-squares nondecreasing fit to ``y (K,)`` (weights ``(K,)``, default 1); returns ``(K,)``."""
    y = np.asarray(y, float)
    w = np.ones_like(y) if weight is None else np.asarray(weight, float)
    values, weights, sizes = [], [], []
    for yi, wi in zip(y, w):
        values.append(yi)
        weights.append(wi)
        sizes.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            v, wt, n = values.pop(), weights.pop(), sizes.pop()
            total = weights[-1] + wt
            values[-1] = (values[-1] * weights[-1] + v * wt) / total
            weights[-1], sizes[-1] = total, sizes[-1] + n
    return np.repeat(values, sizes)


def fit_isotonic(error: np.ndarray, variance: np.ndarray) -> dict[str, list[float]]:
    """Isotonic recalibration map of the CDF levels ``u = Phi(err / sqrt(var))`` (Kuleshov 2018).

    Args:
        error: ``(K,)`` true minus predicted; variance: ``(K,)`` (already scaled by step 1).

    Returns:
        ``{"x": [...], "y": [...]}``: knots of a nondecreasing piecewise-linear map of ``[0, 1]``
        onto ``[0, 1]`` with ``R(0) = 0`` and ``R(1) = 1``.
    """
    error, variance = np.asarray(error, float).ravel(), np.asarray(variance, float).ravel()
    used = variance > 0  # zero-variance entries (isolated atoms) have no CDF level
    u = np.sort(stats.norm.cdf(error[used] / np.sqrt(variance[used])))
    observed = np.searchsorted(u, u, side="right") / u.size  # fraction of levels <= u
    fitted = pool_adjacent_violators(observed)
    x = np.unique(u)  # ties share the value of their last member
    y = fitted[np.searchsorted(u, x, side="right") - 1]
    keep = (x > 0) & (x < 1)
    x = np.concatenate([[0.0], x[keep], [1.0]])
    y = np.concatenate([[0.0], np.clip(y[keep], 0.0, 1.0), [1.0]])
    return {"x": x.tolist(), "y": np.maximum.accumulate(y).tolist()}


def force_reference(pred: Predictions, calibration: dict) -> dict:
    """Reference distributions of the calibration set for thresholds in calibrated units.

    Per element (symbol) and over all atoms (``"all"``), the :data:`REFERENCE_QUANTILES` of

    - ``force_error``: the per-atom force error norm ``|F_true - F_pred|``, eV/A;
    - ``force_std``: the calibrated per-atom force std ``sqrt(factor * v_i)``, eV/A (with a
      power-law map, of the mapped ``v_i``), the quantity the MD monitor compares with its
      thresholds (``factor``: the forces variance factor).

    Args:
        pred: predictions with uncertainty and ``numbers``.
        calibration: the fitted calibration (scales, isotonic and power-law maps).

    Returns:
        ``{"quantiles": [...], "force_error": {key: [...]}, "force_std": {key: [...]},
        "n_atoms": {key: count}}``, plain floats (stored in the checkpoint).
    """
    from ase.data import chemical_symbols

    error = np.linalg.norm(pred.forces_error, axis=1)
    std = np.sqrt(calibrated_forces_variance(np.clip(pred.forces_variance, 0.0, None), calibration, pred.n_atoms))
    groups = {"all": np.ones(len(error), bool)}
    groups.update({chemical_symbols[z]: pred.numbers == z for z in np.unique(pred.numbers)})
    q = list(REFERENCE_QUANTILES)
    return {
        "quantiles": q,
        "force_error": {k: np.quantile(error[m], q).tolist() for k, m in groups.items()},
        "force_std": {k: np.quantile(std[m], q).tolist() for k, m in groups.items()},
        "n_atoms": {k: int(m.sum()) for k, m in groups.items()},
    }
