"""Predictions of one model on one labelled data set, with the errors the metrics need."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Predictions:
    """Predictions of one model on one labelled data set (``F`` structures, ``M`` atoms).

    Attributes:
        energy_true, energy_pred: ``(F,)`` eV. forces_true, forces_pred: ``(M, 3)`` eV/A.
        n_atoms: ``(F,)``.
        energy_variance: ``(F,)`` eV^2, uncalibrated; None for a deterministic model.
        forces_variance: ``(M,)`` eV^2/A^2 per atom (trace), uncalibrated; None likewise.
        numbers: ``(M,)`` atomic numbers of the atoms (None where unknown).
    """

    energy_true: np.ndarray
    energy_pred: np.ndarray
    forces_true: np.ndarray
    forces_pred: np.ndarray
    n_atoms: np.ndarray
    energy_variance: np.ndarray | None = None
    forces_variance: np.ndarray | None = None
    numbers: np.ndarray | None = None

    @property
    def energy_error(self) -> np.ndarray:
        """``(F,)`` true minus predicted, eV."""
        return self.energy_true - self.energy_pred

    @property
    def forces_error(self) -> np.ndarray:
        """``(M, 3)`` true minus predicted, eV/A."""
        return self.forces_true - self.forces_pred

    @property
    def has_uncertainty(self) -> bool:
        return self.forces_variance is not None

    def component_variance(self, factor: float = 1.0, *, power: dict[str, float] | None = None) -> np.ndarray:
        """``(M*3,)`` isotropic force component variances ``factor * P(v) / 3``, per error component
        (``P``: the calibration's power-law map of the per-atom variance, identity for None)."""
        from blip_ase.inference.calibration import apply_power

        return np.repeat(factor * apply_power(self.forces_variance, power, self.n_atoms) / 3.0, 3)
