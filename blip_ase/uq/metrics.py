"""Accuracy and uncertainty metrics, with the definitions pinned in DESIGN.md ("Uncertainty metrics").

Notation: ``F`` structures with ``M`` atoms in total; forces ``(M, 3)`` eV/A; per-atom force
variance ``v (M,)`` eV^2/A^2 is the trace of the atom's 3x3 covariance (the calculator's
``forces_variance``), so the isotropic component standard deviation is ``sigma = sqrt(v / 3)``.
Errors are ``true - predicted``. numpy/scipy only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import integrate, stats

ECE_GRID = np.linspace(0.01, 0.99, 100)
"""The 100 probability levels in (0, 1) at which the calibration curve is evaluated."""
_TINY_VARIANCE = 1e-300  # a zero predicted variance would make z = err / 0


def mae(error: np.ndarray) -> float:
    """Mean absolute error over all elements of ``error`` (any shape)."""
    return float(np.mean(np.abs(error)))


def rmse(error: np.ndarray) -> float:
    """Root mean squared error over all elements of ``error`` (any shape)."""
    return float(np.sqrt(np.mean(np.square(error))))


def component_sigma(forces_variance: np.ndarray) -> np.ndarray:
    """Isotropic per-component force std ``sqrt(v / 3)``; ``(M,)`` eV^2/A^2 -> ``(M,)`` eV/A."""
    return np.sqrt(np.asarray(forces_variance, dtype=float) / 3.0)


def _z(error: np.ndarray, variance: np.ndarray) -> np.ndarray:
    return np.asarray(error, float) / np.sqrt(np.maximum(np.asarray(variance, float), _TINY_VARIANCE))


def gaussian_nll(error: np.ndarray, variance: np.ndarray) -> float:
    """Mean Gaussian negative log-likelihood ``0.5 log(2 pi var) + err^2 / (2 var)``.

    Args:
        error: ``(K,)`` true minus predicted mean; variance: ``(K,)`` predicted variance
            (same units squared). Returns nats per element.
    """
    var = np.maximum(np.asarray(variance, float), _TINY_VARIANCE)
    return float(np.mean(0.5 * np.log(2.0 * np.pi * var) + 0.5 * np.square(error) / var))


def gaussian_crps(error: np.ndarray, variance: np.ndarray) -> float:
    """Mean closed-form Gaussian CRPS ``sigma (z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi))``.

    Args:
        error: ``(K,)`` true minus predicted mean; variance: ``(K,)``. Returns the units of ``error``.
    """
    sigma = np.sqrt(np.maximum(np.asarray(variance, float), _TINY_VARIANCE))
    z = np.asarray(error, float) / sigma
    crps = sigma * (z * (2.0 * stats.norm.cdf(z) - 1.0) + 2.0 * stats.norm.pdf(z) - 1.0 / np.sqrt(np.pi))
    return float(np.mean(crps))


def calibration_curve(
    error: np.ndarray, variance: np.ndarray, *, cdf_map: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Observed versus expected frequency of ``Phi(err / sigma) <= p``.

    Args:
        error: ``(K,)`` true minus predicted; variance: ``(K,)`` predicted variance.
        cdf_map: optional recalibration ``[0, 1] -> [0, 1]`` applied to ``Phi(z)`` (isotonic).

    Returns:
        ``p`` ``(100,)`` = :data:`ECE_GRID` and ``p_obs`` ``(100,)``, the fraction of elements with
        ``Phi(z) <= p``.
    """
    u = stats.norm.cdf(_z(error, variance)).ravel()
    if cdf_map is not None:
        u = cdf_map(u)
    p_obs = np.searchsorted(np.sort(u), ECE_GRID, side="right") / u.size
    return ECE_GRID.copy(), p_obs


def expected_calibration_error(
    error: np.ndarray, variance: np.ndarray, *, cdf_map: Callable[[np.ndarray], np.ndarray] | None = None
) -> float:
    """Trapezoid integral of ``|p_obs - p|`` over :data:`ECE_GRID` (0 = calibrated, < 0.5 always).

    For forces pass every component: ``error (M*3,)`` and ``variance = v / 3`` repeated per
    component. Arguments as for :func:`calibration_curve`.
    """
    p, p_obs = calibration_curve(error, variance, cdf_map=cdf_map)
    return float(integrate.trapezoid(np.abs(p_obs - p), p))


def sharpness(variance: np.ndarray) -> float:
    """Root mean predicted variance ``sqrt(mean(var))`` (uncertainty-toolbox's sharpness)."""
    return float(np.sqrt(np.mean(variance)))


def per_structure_mean(values: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """Mean of per-atom ``values (M,)`` within each structure; ``n_atoms (F,)`` -> ``(F,)``."""
    starts = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(int)
    return np.add.reduceat(np.asarray(values, float), starts) / np.asarray(n_atoms)


def per_structure_max(values: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """Maximum of per-atom ``values (M,)`` within each structure; ``(F,)``."""
    starts = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(int)
    return np.maximum.reduceat(np.asarray(values, float), starts)


def spearman(forces_error: np.ndarray, forces_variance: np.ndarray, n_atoms: np.ndarray) -> float | None:
    """Spearman rank correlation, per structure, of the mean predicted per-atom variance and the
    mean squared per-atom error ``|F_i - F_hat_i|^2``.

    Args:
        forces_error: ``(M, 3)`` eV/A; forces_variance: ``(M,)`` eV^2/A^2; n_atoms: ``(F,)``.

    Returns:
        The coefficient, or None when it is undefined (fewer than 3 structures or a constant input).
    """
    err2 = per_structure_mean(np.square(forces_error).sum(axis=-1), n_atoms)
    var = per_structure_mean(forces_variance, n_atoms)
    if len(err2) < 3 or np.ptp(err2) == 0 or np.ptp(var) == 0:
        return None
    return float(stats.spearmanr(var, err2).statistic)


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating in- (label 0) from out-of-distribution
    (label 1) structures: the probability that a random OOD score exceeds a random ID score
    (ties count one half; Mann-Whitney U).

    Args:
        scores_in: ``(F_in,)``; scores_out: ``(F_out,)``; higher = more uncertain.
    """
    scores_in, scores_out = np.asarray(scores_in, float), np.asarray(scores_out, float)
    if not scores_in.size or not scores_out.size:
        raise ValueError("AUROC needs at least one in-distribution and one out-of-distribution score")
    ranks = stats.rankdata(np.concatenate([scores_in, scores_out]))
    n_out = scores_out.size
    u = ranks[scores_in.size :].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (scores_in.size * n_out))
