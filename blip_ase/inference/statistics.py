"""Monte Carlo means and calibrated unbiased variances of one structure's samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from blip_ase.inference.calibration import apply_power


def monte_carlo_statistics(raw: Mapping[str, np.ndarray], factors: Mapping[str, float], *, keep_samples: bool = False,
                           forces_power: Mapping[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """MC means and calibrated unbiased (ddof=1) variances of one structure's samples.

    Args:
        raw: ``energy (S,)`` eV, ``forces (S, n, 3)`` eV/A and for periodic cells ``stress (S, 6)``
            eV/A^3 (ASE Voigt order).
        factors: variance multipliers ``{"energy", "forces", "stress"}`` (the calibration).
        keep_samples: also return ``energy_samples`` and ``forces_samples``.
        forces_power: the calibration's power-law map of the per-atom force variance, applied
            before ``factors["forces"]`` (:func:`~blip_ase.inference.calibration.apply_power`); None: none.

    Returns:
        ``energy``, ``free_energy`` (eV), ``forces (n, 3)`` eV/A, ``energy_variance`` eV^2,
        ``forces_variance (n,)`` eV^2/A^2 (per atom: the trace of its force covariance), for
        periodic cells ``stress (6,)`` and ``stress_variance (6,)``, with ``keep_samples`` also
        ``energy_samples (S,)`` and ``forces_samples (S, n, 3)``.
    """
    energy = float(raw["energy"].mean())
    forces_variance = apply_power(raw["forces"].var(axis=0, ddof=1).sum(axis=-1), forces_power)
    results: dict[str, Any] = {
        "energy": energy,
        "free_energy": energy,
        "forces": raw["forces"].mean(axis=0),
        "energy_variance": float(raw["energy"].var(ddof=1)) * factors["energy"],
        "forces_variance": forces_variance * factors["forces"],
    }
    if "stress" in raw:
        results["stress"] = raw["stress"].mean(axis=0)
        results["stress_variance"] = raw["stress"].var(axis=0, ddof=1) * factors["stress"]
    if keep_samples:
        results["energy_samples"] = raw["energy"]
        results["forces_samples"] = raw["forces"]
    return results


def map_results(raw: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """MAP results of one structure from one deterministic pass: ``energy (1,)``, ``forces (1, n, 3)``
    and for periodic cells ``stress (1, 6)`` become ``energy``, ``free_energy``, ``forces (n, 3)``,
    ``stress (6,)``; no variances."""
    energy = float(raw["energy"][0])
    results: dict[str, Any] = {"energy": energy, "free_energy": energy, "forces": raw["forces"][0]}
    if "stress" in raw:
        results["stress"] = raw["stress"][0]
    return results
