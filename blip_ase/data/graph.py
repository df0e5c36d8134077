"""Atoms -> graph: matscipy neighbour lists and a batched graph of tensors.

Conventions: edge ``e = (i, j)`` with ``edge_index[0] = i`` (receiver) and
``edge_index[1] = j`` (sender); the edge vector is
``r_ij = positions[j] - positions[i] + cell_shifts[e] @ cell[graph of i]`` in Angstrom.
Edges are sorted by ``(i, j, shift)`` so that the same structure, rotated or translated,
gives the same edge order (and so the same noise per edge for a fixed seed).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from ase import Atoms
from matscipy.neighbours import neighbour_list


@dataclass
class AtomGraph:
    """A batch of ``n_graphs`` atomic structures as one disjoint graph.

    Attributes:
        species: ``(N,)`` long, index of each atom's element in the model's element list.
        positions: ``(N, 3)`` Angstrom.
        edge_index: ``(2, E)`` long, (receiver i, sender j).
        cell_shifts: ``(E, 3)`` integer lattice shifts (stored as float) of sender j.
        cell: ``(G, 3, 3)`` Angstrom, rows are lattice vectors (zeros for molecules).
        pbc: ``(G, 3)`` bool.
        batch: ``(N,)`` long, graph index of each atom.
        n_atoms: ``(G,)`` long.
    """

    species: torch.Tensor
    positions: torch.Tensor
    edge_index: torch.Tensor
    cell_shifts: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    batch: torch.Tensor
    n_atoms: torch.Tensor

    @property
    def n_graphs(self) -> int:
        return int(self.n_atoms.shape[0])

    @property
    def periodic(self) -> bool:
        """True when every structure is periodic in all three directions (stress is defined)."""
        return bool(self.pbc.all())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AtomGraph:
        """Copy to ``device``; floating tensors also to ``dtype``."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)
        return AtomGraph(**out)

    def replicate(self, n_copies: int) -> AtomGraph:
        """``n_copies`` copies of the whole batch as one disjoint graph (copy-major order)."""
        if n_copies == 1:
            return self
        n, g = self.positions.shape[0], self.n_graphs
        offsets = torch.arange(n_copies, device=self.batch.device)
        edge_index = (self.edge_index[:, None, :] + (offsets * n)[None, :, None]).reshape(2, -1)
        batch = (self.batch[None, :] + (offsets * g)[:, None]).reshape(-1)
        return AtomGraph(
            species=self.species.repeat(n_copies),
            positions=self.positions.repeat(n_copies, 1),
            edge_index=edge_index,
            cell_shifts=self.cell_shifts.repeat(n_copies, 1),
            cell=self.cell.repeat(n_copies, 1, 1),
            pbc=self.pbc.repeat(n_copies, 1),
            batch=batch,
            n_atoms=self.n_atoms.repeat(n_copies),
        )

    def with_positions(self, positions: torch.Tensor) -> AtomGraph:
        return replace(self, positions=positions)


def species_index(numbers: np.ndarray, elements: list[int]) -> np.ndarray:
    """Map atomic numbers to indices into ``elements``; unknown elements raise ``ValueError``."""
    from ase.data import chemical_symbols

    lookup = {z: k for k, z in enumerate(elements)}
    unknown = sorted({int(z) for z in numbers} - lookup.keys())
    if unknown:
        raise ValueError(
            f"unknown element(s) {[chemical_symbols[z] for z in unknown]}: the model knows only "
            f"{[chemical_symbols[z] for z in elements]}"
        )
    return np.array([lookup[int(z)] for z in numbers], dtype=np.int64)


def validate_atoms(atoms: Atoms) -> None:
    """Raise ``ValueError`` for structures no model can evaluate."""
    if len(atoms) == 0:
        raise ValueError("the structure has no atoms")
    if not np.all(np.isfinite(atoms.positions)):
        bad = np.where(~np.isfinite(atoms.positions).all(axis=1))[0]
        raise ValueError(f"positions contain NaN or infinite values (atoms {bad[:10].tolist()})")
    pbc = atoms.pbc
    if pbc.any():
        cell = atoms.cell.array
        if not np.all(np.isfinite(cell)):
            raise ValueError("the cell contains NaN or infinite values")
        if abs(np.linalg.det(cell)) < 1e-9:
            raise ValueError(
                f"the cell has zero volume (pbc={pbc.tolist()}): a periodic structure needs three "
                "linearly independent cell vectors"
            )


def atoms_to_graph(atoms: Atoms, *, cutoff: float, elements: list[int]) -> AtomGraph:
    """Graph of one structure with all pairs closer than ``cutoff`` (Angstrom).

    Raises:
        ValueError: empty structure, NaN/infinite positions, degenerate periodic cell, or an
            element that is not in ``elements`` (the message lists the known ones).
    """
    validate_atoms(atoms)
    species = species_index(atoms.numbers, elements)
    if atoms.pbc.any():
        i, j, shifts = neighbour_list("ijS", atoms, cutoff)
    else:  # a non-periodic box around the molecule, padded so flat or single-atom ones work
        pos = atoms.positions
        box = np.diag(np.ptp(pos, axis=0) + 2.0 * cutoff + 1.0)
        i, j, shifts = neighbour_list(
            "ijS", positions=pos, cutoff=cutoff, cell=box, pbc=[False] * 3, cell_origin=pos.min(axis=0) - cutoff
        )
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
    i, j, shifts = i[order], j[order], shifts[order]
    n = len(atoms)
    return AtomGraph(
        species=torch.from_numpy(species),
        positions=torch.tensor(atoms.positions, dtype=torch.float64),
        edge_index=torch.from_numpy(np.stack([i, j]).astype(np.int64)),
        cell_shifts=torch.from_numpy(shifts.astype(np.float64)),
        cell=torch.tensor(np.asarray(atoms.cell.array, dtype=np.float64)[None]),
        pbc=torch.tensor(np.asarray(atoms.pbc, dtype=bool)[None]),
        batch=torch.zeros(n, dtype=torch.long),
        n_atoms=torch.tensor([n]),
    )


def molecules_to_graph(structures: list[Atoms], *, cutoff: float, elements: list[int]) -> AtomGraph:
    """The batch of :func:`atoms_to_graph` of non-periodic ``structures`` from one neighbour list.

    The molecules are set apart along x (by their extent plus twice the cutoff) only for the
    neighbour search, so no pair spans two molecules; positions and edges are each molecule's own,
    in :func:`atoms_to_graph`'s order. For many small molecules (batched walkers) one matscipy call
    replaces one per molecule.

    Raises:
        ValueError: as :func:`atoms_to_graph`, or a periodic structure.
    """
    for atoms in structures:
        validate_atoms(atoms)
        if atoms.pbc.any():
            raise ValueError("molecules_to_graph takes non-periodic structures only; use atoms_to_graph")
    numbers = np.concatenate([a.numbers for a in structures])
    species = species_index(numbers, elements)
    positions = np.concatenate([a.positions for a in structures])
    sizes = np.array([len(a) for a in structures])
    lows = np.array([a.positions.min(axis=0) for a in structures])
    widths = np.array([np.ptp(a.positions, axis=0) for a in structures])
    starts = np.concatenate([[0.0], np.cumsum(widths[:, 0] + 2.0 * cutoff + 1.0)[:-1]])
    shift = np.repeat(np.column_stack([starts, np.zeros((len(starts), 2))]) - lows, sizes, axis=0)
    apart = positions + shift
    box = np.diag([starts[-1] + widths[-1, 0] + 2.0 * cutoff + 1.0, *(widths[:, 1:].max(axis=0) + 2.0 * cutoff + 1.0)])
    origin = -cutoff * np.ones(3)
    i, j = neighbour_list("ij", positions=apart, cutoff=cutoff, cell=box, pbc=[False] * 3, cell_origin=origin)
    order = np.lexsort((j, i))
    i, j = i[order], j[order]
    n_graphs = len(structures)
    return AtomGraph(
        species=torch.from_numpy(species),
        positions=torch.tensor(positions, dtype=torch.float64),
        edge_index=torch.from_numpy(np.stack([i, j]).astype(np.int64)),
        cell_shifts=torch.zeros(len(i), 3, dtype=torch.float64),
        cell=torch.tensor(np.stack([np.asarray(a.cell.array, dtype=np.float64) for a in structures])),
        pbc=torch.zeros(n_graphs, 3, dtype=torch.bool),
        batch=torch.from_numpy(np.repeat(np.arange(n_graphs), sizes)),
        n_atoms=torch.from_numpy(sizes.astype(np.int64)),
    )


def batch_graphs(graphs: list[AtomGraph]) -> AtomGraph:
    """Concatenate graphs into one disjoint batch."""
    if len(graphs) == 1:
        return graphs[0]
    node_offsets = torch.cumsum(torch.tensor([0] + [g.positions.shape[0] for g in graphs[:-1]]), 0)
    graph_offsets = torch.cumsum(torch.tensor([0] + [g.n_graphs for g in graphs[:-1]]), 0)
    return AtomGraph(
        species=torch.cat([g.species for g in graphs]),
        positions=torch.cat([g.positions for g in graphs]),
        edge_index=torch.cat([g.edge_index + int(o) for g, o in zip(graphs, node_offsets)], dim=1),
        cell_shifts=torch.cat([g.cell_shifts for g in graphs]),
        cell=torch.cat([g.cell for g in graphs]),
        pbc=torch.cat([g.pbc for g in graphs]),
        batch=torch.cat([g.batch + int(o) for g, o in zip(graphs, graph_offsets)]),
        n_atoms=torch.cat([g.n_atoms for g in graphs]),
    )
