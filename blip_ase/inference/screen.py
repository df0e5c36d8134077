"""A cheap uncertainty screen from alpha/beta: when can a Monte Carlo check be skipped?

The inference network's alpha (per edge) and beta (per node) cost a small fraction of a MAP
pass, and they are what makes the Monte Carlo force std large away from the training data. The
screen maps a per-atom summary of them, with the MAP force (free in MAP-driven dynamics) and the
nearest-neighbour distance, to an expected per-atom force std::

    log std_i ~ w . x_i,   x_i = [1, one-hot element, log mean alpha_l over i's edges (per edge layer),
                                  log max alpha_l over i's edges, log beta_l(i) (per node layer),
                                  log nearest-neighbour distance, log(|F_i| + 0.1) of the MAP force]

fitted by ridge least squares on unlabelled structures (the calibration set and rattled copies
of it; :func:`fit_screen`), and made conservative by ``safety``, the largest ratio of the Monte
Carlo std to the screen's estimate on the fitting set. A monitor skips the Monte Carlo check of
a frame only when ``safety * estimate`` stays below every atom's flag threshold; anything else
is confirmed by samples. The screen is stored in the checkpoint (``screen``) by ``blip calibrate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms

RATTLE_AMPLITUDES_A = (0.05, 0.1, 0.15, 0.2, 0.3)
"""Rattle amplitudes (A, std of Gaussian displacements) of the copies the screen is fitted on."""
RIDGE = 1e-3
_TINY = 1e-12


@dataclass(frozen=True)
class Screen:
    """A fitted screen (plain floats: stored in checkpoints).

    Attributes:
        weights: ``(D,)`` coefficients of :func:`atom_features`'s columns.
        safety: largest Monte Carlo std / estimate on the fitting set (>= 1 is typical).
        n_elements: number of model elements (one-hot columns).
        n_structures: structures of the fitting set; rms_log_error: rms of the log residuals.
    """

    weights: tuple[float, ...]
    safety: float
    n_elements: int
    n_structures: int = 0
    rms_log_error: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["weights"] = list(self.weights)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Screen:
        """Rebuild a stored screen.

        Raises:
            ValueError: missing keys or non-finite numbers.
        """
        try:
            screen = cls(tuple(float(w) for w in data["weights"]), float(data["safety"]), int(data["n_elements"]),
                         int(data.get("n_structures", 0)), float(data.get("rms_log_error", float("nan"))))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed uncertainty screen in the checkpoint: {exc}") from None
        if not (np.isfinite(screen.weights).all() and np.isfinite(screen.safety) and screen.safety > 0):
            raise ValueError("malformed uncertainty screen in the checkpoint: non-finite weights or safety")
        return screen

    def estimate(self, features: np.ndarray) -> np.ndarray:
        """``(n,)`` expected per-atom force std (eV/A, uncalibrated) from ``(n, D)`` features."""
        if features.shape[1] != len(self.weights):
            raise ValueError(f"the screen has {len(self.weights)} weights but the features have {features.shape[1]} "
                             "columns (another model?)")  # fmt: skip
        return np.exp(features @ np.asarray(self.weights))


def feature_count(n_elements: int, n_edge_columns: int, n_node_columns: int) -> int:
    """Columns of :func:`atom_features` for a model with these elements and alpha/beta columns."""
    return 1 + n_elements + 2 * n_edge_columns + n_node_columns + 2


def atom_features(coefficients: Any, inputs: Any, forces: np.ndarray, n_elements: int) -> np.ndarray:
    """``(N, D)`` per-atom inputs of the screen from one configuration's alpha/beta and MAP forces.

    Args:
        coefficients: :class:`~blip_ase.bayes.Coefficients` (``edge (E, Le)``, ``node (N, Ln)``).
        inputs: the configuration's :class:`~blip_ase.bayes.PosteriorInputs` (species, edges).
        forces: ``(N, 3)`` MAP forces, eV/A (free in MAP-driven dynamics).
        n_elements: number of the model's elements.

    Columns: 1, one-hot element, log mean and log max alpha over the atom's edges (per edge
    layer), log beta (per node layer), ``log(|F_i| + 0.1)`` and the log distance to the nearest
    neighbour. An atom without edges gets the configuration's smallest alpha and the largest
    distance seen (it has no neighbours to be wrong about; the monitor's physical checks handle
    isolated atoms).
    """
    edge = coefficients.edge.detach().to("cpu", torch.float64)
    node = coefficients.node.detach().to("cpu", torch.float64).numpy()
    receivers, species = inputs.edge_index[0].cpu(), inputs.species.cpu().numpy()
    distance = inputs.edge_vector.detach().to("cpu", torch.float64).norm(dim=-1)
    n = len(species)
    counts = torch.bincount(receivers, minlength=n).to(torch.float64)[:, None]
    mean = torch.zeros(n, edge.shape[1], dtype=torch.float64).index_add_(0, receivers, edge) / counts.clamp_min(1)
    rows = receivers[:, None].expand_as(edge)
    peak = torch.zeros(n, edge.shape[1], dtype=torch.float64).scatter_reduce_(0, rows, edge, "amax", include_self=False)
    nearest = torch.full((n,), float("inf"), dtype=torch.float64).scatter_reduce_(0, receivers, distance, "amin")
    lonely = (counts[:, 0] == 0).numpy()
    mean, peak, nearest = mean.numpy(), peak.numpy(), nearest.numpy()
    mean[lonely] = peak[lonely] = float(edge.min()) if edge.numel() else 1.0
    nearest[lonely] = float(distance.max()) if distance.numel() else 1.0
    onehot = np.eye(n_elements)[species]
    logs = np.log(np.maximum(np.concatenate([mean, peak, node, nearest[:, None]], axis=1), _TINY))
    force = np.log(np.linalg.norm(np.asarray(forces, float).reshape(n, 3), axis=1) + 0.1)[:, None]
    return np.concatenate([np.ones((n, 1)), onehot, logs, force], axis=1)


def fit_screen(features: Sequence[np.ndarray], stds: Sequence[np.ndarray], *, n_elements: int) -> Screen:
    """Ridge fit of ``log std`` on the features, with the safety factor of the fitting set.

    Args:
        features: per structure ``(n, D)`` from :func:`atom_features`.
        stds: per structure ``(n,)`` Monte Carlo per-atom force std (uncalibrated), eV/A.
        n_elements: number of the model's elements.

    Raises:
        ValueError: no atom with a positive finite std to fit on.
    """
    x = np.concatenate(features)
    y = np.concatenate(stds)
    keep = np.isfinite(y) & (y > _TINY) & np.isfinite(x).all(axis=1)
    if keep.sum() < x.shape[1]:
        raise ValueError(f"cannot fit the uncertainty screen: {int(keep.sum())} usable atoms for {x.shape[1]} inputs")
    x, log_y = x[keep], np.log(y[keep])
    penalty = RIDGE * np.eye(x.shape[1])
    penalty[0, 0] = 0.0  # no penalty on the intercept
    weights = np.linalg.solve(x.T @ x + penalty * len(x), x.T @ log_y)
    residual = log_y - x @ weights
    return Screen(
        weights=tuple(float(w) for w in weights),
        safety=float(np.exp(residual.max())),
        n_elements=n_elements,
        n_structures=len(features),
        rms_log_error=float(np.sqrt(np.mean(residual**2))),
    )


def rattled_copies(frames: Sequence[Atoms], *, seed: int = 0) -> list[Atoms]:
    """``frames`` and, for each amplitude of :data:`RATTLE_AMPLITUDES_A`, a rattled copy of each
    (seeded): the fitting set of the screen, from near equilibrium to strongly distorted."""
    rng = np.random.default_rng(seed)
    out = [Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc) for a in frames]
    for amplitude in RATTLE_AMPLITUDES_A:
        for atoms in frames:
            copy = Atoms(atoms.numbers, atoms.positions + rng.normal(scale=amplitude, size=(len(atoms), 3)),
                         cell=atoms.cell, pbc=atoms.pbc)  # fmt: skip
            out.append(copy)
    return out
