"""Labelled graphs and mini-batches for training and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms

from blip_ase.data.graph import AtomGraph
from blip_ase.data.readers import frame_labels
from blip_ase.voigt import voigt_to_matrix


@dataclass
class Batch:
    """A mini-batch: graph plus reference labels.

    Attributes:
        graph: ``G`` structures, ``N`` atoms in total.
        energy: ``(G,)`` eV. forces: ``(N, 3)`` eV/A. stress: ``(G, 3, 3)`` eV/A^3 or None.
    """

    graph: AtomGraph
    energy: torch.Tensor
    forces: torch.Tensor
    stress: torch.Tensor | None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Batch:
        return Batch(
            self.graph.to(device, dtype),
            self.energy.to(device, dtype),
            self.forces.to(device, dtype),
            None if self.stress is None else self.stress.to(device, dtype),
        )


class GraphDataset:
    """Structures with labels, converted to a backend's graphs once.

    Args:
        frames: labelled structures (energy and forces required; stress if ``use_stress``).
        to_graph: ``Atoms -> graph`` of the backend (it validates the structure).
        collate: ``list[graph] -> batched graph``.
        use_stress: also require and batch stress labels.
        name: used in error messages (e.g. the file name).
    """

    def __init__(
        self,
        frames: list[Atoms],
        *,
        to_graph: Callable[[Atoms], Any],
        collate: Callable[[list[Any]], Any],
        use_stress: bool = False,
        name: str = "data",
    ):
        self.frames, self.collate, self.use_stress = frames, collate, use_stress
        self.graphs: list[Any] = []
        self.labels = []
        for k, atoms in enumerate(frames):
            where = f"{name}: frame {k}"
            self.labels.append(frame_labels(atoms, need_stress=use_stress, where=where))
            try:
                self.graphs.append(to_graph(atoms))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc

    def __len__(self) -> int:
        return len(self.graphs)

    def batch(self, indices: list[int] | np.ndarray) -> Batch:
        labels = [self.labels[k] for k in indices]
        stress = None
        if self.use_stress:
            stress = torch.tensor(voigt_to_matrix(np.stack([lab["stress"] for lab in labels])))
        return Batch(
            graph=self.collate([self.graphs[k] for k in indices]),
            energy=torch.tensor([lab["energy"] for lab in labels], dtype=torch.float64),
            forces=torch.tensor(np.concatenate([lab["forces"] for lab in labels])),
            stress=stress,
        )

    def batch_indices(
        self, batch_size: int, *, shuffle: bool = False, rng: np.random.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[np.ndarray]:  # fmt: skip
        """Indices of each mini-batch; with ``shuffle`` the order comes from ``rng`` (seeded by the caller).

        With ``shard = (rank, n)`` (distributed training) the order is padded with its first
        structures to a multiple of ``n`` and rank ``rank`` gets structures ``rank, rank + n, ...``
        of each batch of ``batch_size`` (a multiple of ``n``), so every rank takes the same number
        of equal steps. ``(0, 1)``: the whole batches.
        """
        order = np.arange(len(self))
        if shuffle:
            if rng is None:
                raise ValueError("shuffle needs an explicit rng")
            order = rng.permutation(order)
        rank, n = shard
        if n > 1:
            order = np.resize(order, len(order) + (-len(order)) % n)  # pads by repeating from the start
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size][rank::n]

    def batches(self, batch_size: int, **kwargs) -> Iterator[Batch]:
        """Mini-batches of :meth:`batch_indices` (same keyword arguments)."""
        for indices in self.batch_indices(batch_size, **kwargs):
            yield self.batch(indices)


def fit_reference_energies(frames: list[Atoms], energies: np.ndarray, elements: list[int]) -> np.ndarray:
    """Per-element energies (eV) minimising ``sum (E - counts @ e_ref)^2`` (min-norm lstsq).

    Args:
        frames: structures; energies: ``(F,)`` eV; elements: atomic numbers (column order).
    """
    lookup = {z: k for k, z in enumerate(elements)}
    counts = np.zeros((len(frames), len(elements)))
    for row, atoms in enumerate(frames):
        for z in atoms.numbers:
            counts[row, lookup[int(z)]] += 1
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return solution


def energy_statistics(
    frames: list[Atoms], energies: np.ndarray, forces: np.ndarray, elements: list[int]
) -> tuple[np.ndarray, np.ndarray, float]:
    """What every backend's normalisation is fitted from (one home for PaiNN and ORB).

    Args:
        frames: training structures; energies: ``(F,)`` eV; forces: ``(sum n, 3)`` eV/A;
            elements: atomic numbers (column order).

    Returns:
        ``(reference, residual, rms)``: per-element reference energies ``(n_elements,)`` eV
        (:func:`fit_reference_energies`), the per-atom residual ``(F,)`` eV/atom of each frame
        after them, and the RMS force component, eV/A.
    """
    energies = np.asarray(energies, dtype=float)
    reference = fit_reference_energies(frames, energies, elements)
    lookup = dict(zip(elements, reference))
    residual = np.array([(e - sum(lookup[int(z)] for z in a.numbers)) / len(a) for e, a in zip(energies, frames)])
    rms = float(np.sqrt(np.mean(np.asarray(forces, dtype=float) ** 2)))
    return reference, residual, rms
