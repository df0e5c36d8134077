"""Uncertainty metrics (ECE, NLL, CRPS, Spearman, AUROC) and post-hoc calibration.

:mod:`blip_ase.uq.metrics` and :mod:`blip_ase.uq.calibration` are numpy/scipy only;
:mod:`blip_ase.uq.evaluate` (predictions through :class:`~blip_ase.BLIPCalculator`, ``blip eval``
and ``blip calibrate``) is imported on demand.
"""

from blip_ase.inference.calibration import variance_factors
from blip_ase.uq.calibration import fit_isotonic, fit_power_law, fit_variance_scale
from blip_ase.uq.metrics import (
    auroc,
    calibration_curve,
    expected_calibration_error,
    gaussian_crps,
    gaussian_nll,
    spearman,
)

__all__ = [
    "auroc",
    "calibration_curve",
    "expected_calibration_error",
    "fit_isotonic",
    "fit_power_law",
    "fit_variance_scale",
    "gaussian_crps",
    "gaussian_nll",
    "spearman",
    "variance_factors",
]
