"""Applying a stored variance calibration: validation and variance multipliers (numpy/scipy only).

What ``blip calibrate`` fits (:mod:`blip_ase.uq.calibration`) is stored in the checkpoint as
plain floats and lists: a variance scale per quantity (keys ``energy``, ``forces``, ``stress``)
and optional isotonic maps ``"<quantity>_isotonic": {"x": [...], "y": [...]}``, knots of a
nondecreasing piecewise-linear map ``R`` of predicted CDF levels. The inference engine reports
variances multiplied by ``scale * E_G[z^2]``, the second moment of the recalibrated standardised
error distribution ``G(z) = R(Phi(z))`` (:func:`isotonic_variance_factor`).

Optionally the forces carry a power-law map ``"forces_power": {"gamma": g, "reference": v_ref}``
applied to the per-atom variance (trace, eV^2/A^2) before the scale:
``v' = scale * v_ref * (v / v_ref) ** g`` (:func:`apply_power`). With ``g = 1`` it is the global
scale; with ``g > 1`` it inflates large variances (away from the data) more than small ones.
With the optional keys ``"delta": d`` and ``"structure_reference": m_ref`` (``blip calibrate
--power --structure``) the map also grows with the structure's mean per-atom variance ``m``:
``v' = scale * v_ref * (v / v_ref) ** g * (m / m_ref) ** d`` with ``d >= 0``. An atom's variance is
then read in the context of its structure: the same variance means a larger error in a structure
whose atoms are all uncertain (away from the data) than in one where only that atom is.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats

from blip_ase.models.checkpoint import CALIBRATION_QUANTITIES as QUANTITIES
from blip_ase.models.checkpoint import DEFAULT_CALIBRATION, ISOTONIC_KEYS, POWER_KEYS


def apply_isotonic(u: np.ndarray, isotonic: dict[str, list[float]]) -> np.ndarray:
    """Recalibrated levels ``R(u)`` of CDF levels ``u`` (any shape)."""
    return np.interp(u, isotonic["x"], isotonic["y"])


def isotonic_variance_factor(isotonic: dict[str, list[float]]) -> float:
    """``E_G[z^2]`` of the recalibrated standardised error distribution ``G(z) = R(Phi(z))``."""
    z = np.linspace(-12.0, 12.0, 24001)
    cdf = apply_isotonic(stats.norm.cdf(z), isotonic)
    mass = np.diff(np.concatenate([[0.0], cdf, [1.0]]))  # mass beyond +-12 sits at the ends
    grid = np.concatenate([[z[0]], 0.5 * (z[1:] + z[:-1]), [z[-1]]])
    return float(np.sum(mass * grid**2))


def validate_isotonic(name: str, isotonic: object) -> dict[str, list[float]]:
    """Check an isotonic map read from a checkpoint; returns it with float lists.

    Raises:
        ValueError: not ``{"x", "y"}`` lists of equal length >= 2, ``x`` not increasing in
            ``[0, 1]`` or ``y`` not nondecreasing in ``[0, 1]``.
    """
    if not isinstance(isotonic, dict) or set(isotonic) != {"x", "y"}:
        raise ValueError(f"calibration {name!r} must be a dict with keys 'x' and 'y', got {isotonic!r:.80}")
    x, y = np.asarray(isotonic["x"], float), np.asarray(isotonic["y"], float)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"calibration {name!r}: x and y must be equal-length lists of at least 2 numbers")
    ok = np.isfinite(x).all() and np.isfinite(y).all() and (np.diff(x) > 0).all() and (np.diff(y) >= 0).all()
    if not ok or x[0] < 0 or x[-1] > 1 or y[0] < 0 or y[-1] > 1:
        raise ValueError(f"calibration {name!r}: x must increase and y must not decrease, both within [0, 1]")
    return {"x": x.tolist(), "y": y.tolist()}


def structure_means(variance: np.ndarray, n_atoms: np.ndarray | None = None) -> np.ndarray:
    """Each atom's structure mean of the per-atom ``variance (M,)``: ``(M,)``; ``n_atoms (F,)``
    splits the atoms into structures (None: one structure)."""
    variance = np.asarray(variance, float)
    if n_atoms is None:
        return np.full(variance.shape, variance.mean() if variance.size else 0.0)
    n_atoms = np.asarray(n_atoms, int)
    sums = np.add.reduceat(variance, np.concatenate([[0], np.cumsum(n_atoms)[:-1]])) if variance.size else variance
    return np.repeat(sums / np.maximum(n_atoms, 1), n_atoms)


def apply_power(
    variance: np.ndarray, power: Mapping[str, float] | None, n_atoms: np.ndarray | None = None
) -> np.ndarray:
    """Power-law map ``v_ref * (v / v_ref) ** gamma`` of per-atom variances ``v (M,)`` (>= 0), the
    identity for ``power=None``; with ``delta`` in ``power`` also times ``(m / m_ref) ** delta``, ``m``
    each atom's structure mean of ``v`` (:func:`structure_means`; ``n_atoms (F,)`` splits the
    atoms into structures, None: they are one). Monotone nondecreasing in every ``v`` for
    ``gamma > 0`` and ``delta >= 0``, so a bound on the raw variances maps to a bound on the
    mapped ones; zero stays zero."""
    variance = np.asarray(variance, float)
    if power is None:
        return variance
    variance = np.clip(variance, 0.0, None)
    reference, gamma = float(power["reference"]), float(power["gamma"])
    mapped = reference * np.power(variance / reference, gamma)
    if power.get("delta") is not None:
        mean = structure_means(variance, n_atoms) / float(power["structure_reference"])
        mapped = mapped * np.power(mean, float(power["delta"]))
    return mapped


def calibrated_forces_variance(variance: np.ndarray, calibration: Mapping[str, Any],
                               n_atoms: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Per-atom force variances ``(M,)`` eV^2/A^2 as the calculator reports them: the power-law
    map (if any; ``n_atoms`` as for :func:`apply_power`), then the forces scale and isotonic
    factor (:func:`variance_factors`)."""
    return variance_factors(calibration)["forces"] * apply_power(variance, calibration.get("forces_power"), n_atoms)


POWER_MAP_KEYS = ({"gamma", "reference"}, {"gamma", "reference", "delta", "structure_reference"})
"""The key sets a stored power-law map may have (without and with the structure term)."""


def validate_power(name: str, power: object) -> dict[str, float]:
    """Check a power-law map read from a checkpoint; returns it with floats.

    Raises:
        ValueError: keys other than those of :data:`POWER_MAP_KEYS`, ``gamma``, ``reference`` or
            ``structure_reference`` not finite and > 0, or ``delta`` not finite and >= 0.
    """
    if not isinstance(power, Mapping) or set(power) not in POWER_MAP_KEYS:
        raise ValueError(
            f"calibration {name!r} must be a dict with keys 'gamma' and 'reference' (and optionally 'delta' and "
            f"'structure_reference'), got {power!r:.80}"
        )
    values = dict(power)
    finite = all(isinstance(v, numbers.Real) and np.isfinite(v) for v in values.values())
    if not finite or any(v < 0 if k == "delta" else v <= 0 for k, v in values.items()):
        raise ValueError(
            f"calibration {name!r}: gamma, reference and structure_reference must be finite and > 0, delta finite "
            f"and >= 0, got {values}"
        )
    return {k: float(v) for k, v in values.items()}


def validate_calibration(calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated scales (floats; missing ones are 1.0) plus any isotonic and power-law maps.

    Raises:
        ValueError: an unknown key, a scale that is not a finite number >= 0, or a malformed
            isotonic or power-law map.
    """
    merged = {**DEFAULT_CALIBRATION, **dict(calibration or {})}
    unknown = sorted(merged.keys() - DEFAULT_CALIBRATION.keys() - set(ISOTONIC_KEYS) - set(POWER_KEYS))
    if unknown:
        raise ValueError(
            f"unknown calibration keys {unknown}; known: {sorted(DEFAULT_CALIBRATION)}, {list(ISOTONIC_KEYS)} "
            f"and {list(POWER_KEYS)}"
        )
    scales = {k: merged[k] for k in DEFAULT_CALIBRATION}
    if any(not isinstance(v, numbers.Real) or not np.isfinite(v) or v < 0 for v in scales.values()):
        raise ValueError(f"calibration scales must be finite and >= 0, got {scales}")
    result: dict[str, Any] = {k: float(v) for k, v in scales.items()}
    result.update({k: validate_isotonic(k, merged[k]) for k in ISOTONIC_KEYS if merged.get(k) is not None})
    result.update({k: validate_power(k, merged[k]) for k in POWER_KEYS if merged.get(k) is not None})
    return result


def variance_factors(calibration: Mapping[str, Any]) -> dict[str, float]:
    """Total variance multiplier per quantity: the scale times the isotonic factor (if any)."""
    factors = {}
    for q in QUANTITIES:
        factor = float(calibration.get(q, 1.0))
        if calibration.get(f"{q}_isotonic") is not None:
            factor *= isotonic_variance_factor(calibration[f"{q}_isotonic"])
        factors[q] = factor
    return factors
