"""Atoms -> orb-models graphs for the ORB v3 backend, and a training dataset of them.

The graph is orb-models' own (``ase_atoms_to_atom_graphs``: the neighbour radius and maximum
neighbour count of the model's ``SystemConfig``), so a fine-tuned model sees exactly the
graphs its base model was trained on. :class:`OrbGraph` wraps a batch of them with the element
indices BLIP's inference network needs; Monte Carlo samples are replicated with orb-models'
``batch_graphs`` (copy-major, the order of :meth:`blip_ase.bayes.Coefficients.repeat`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from orb_models.forcefield import base
from orb_models.forcefield.atomic_system import SystemConfig, ase_atoms_to_atom_graphs

from blip_ase.data.graph import species_index, validate_atoms


@dataclass
class OrbGraph:
    """A batch of ``G`` structures (``N`` atoms, ``E`` edges) as one orb-models graph.

    Attributes:
        graphs: orb-models ``AtomGraphs``; edge ``e`` has vector
            ``positions[receivers[e]] - positions[senders[e]] + unit_shifts[e] @ cell`` (A).
        species: ``(N,)`` long, index of each atom's element in the model's element list.
    """

    graphs: base.AtomGraphs
    species: torch.Tensor

    @property
    def n_graphs(self) -> int:
        return int(self.graphs.n_node.shape[0])

    @property
    def periodic(self) -> bool:
        """True when every structure is periodic in all three directions (stress is defined)."""
        return bool(self.graphs.pbc.all())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> OrbGraph:
        """Copy to ``device``; floating tensors also to ``dtype``."""
        return OrbGraph(self.graphs.to(device=device, dtype=dtype), self.species.to(device=device))

    def edge_index(self) -> torch.Tensor:
        """``(2, E)`` long: (receiver, sender), the convention of the inference network."""
        return torch.stack([self.graphs.receivers, self.graphs.senders])


def check_pbc(atoms: Atoms) -> None:
    """Raise ``ValueError`` for boundary conditions ORB v3 cannot handle (mixed periodicity)."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any() and not pbc.all():
        raise ValueError(
            f"ORB v3 supports only fully periodic or fully non-periodic structures, got pbc={pbc.tolist()}; "
            "pad the non-periodic directions with vacuum and set pbc=True (or set pbc=False everywhere)"
        )


def atoms_to_orb_graph(
    atoms: Atoms,
    *,
    system_config: SystemConfig,
    elements: list[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> OrbGraph:
    """orb-models graph of one structure (positions wrapped into the cell, as orb-models does;
    edges in canonical order, see :func:`_sort_edges`).

    Raises:
        ValueError: mixed periodic/non-periodic boundary conditions, an empty structure,
            NaN positions, a degenerate periodic cell or an element not in ``elements``.
    """
    check_pbc(atoms)
    validate_atoms(atoms)
    species = torch.from_numpy(species_index(atoms.numbers, elements))
    bare = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    graphs = ase_atoms_to_atom_graphs(bare, system_config, output_dtype=dtype, graph_construction_dtype=dtype)
    return OrbGraph(_sort_edges(graphs), species).to(device)


def _sort_edges(graphs: base.AtomGraphs) -> base.AtomGraphs:
    """Edges sorted by (receiver, sender, lattice shift) instead of by distance.

    The model sums over edges, so this changes nothing but the order; with a canonical order
    a fixed noise draw (one noise row per edge) stays with the same edge when atoms move, and
    a sample is a smooth function of the positions (except where an atom crosses a cell face:
    orb-models wraps positions into the cell, which relabels the lattice shifts of its edges).
    """
    shifts = graphs.edge_features["unit_shifts"].round().long().cpu().numpy()
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], graphs.senders.cpu().numpy(), graphs.receivers.cpu().numpy()))
    order = torch.from_numpy(order).to(graphs.senders.device)
    return graphs._replace(
        senders=graphs.senders[order],
        receivers=graphs.receivers[order],
        edge_features={k: v[order] for k, v in graphs.edge_features.items()},
    )


def batch_orb_graphs(graphs: list[OrbGraph]) -> OrbGraph:
    """Concatenate graphs into one disjoint batch (orb-models' ``batch_graphs``)."""
    if len(graphs) == 1:
        return graphs[0]
    return OrbGraph(base.batch_graphs([g.graphs for g in graphs]), torch.cat([g.species for g in graphs]))


def replicate(graph: OrbGraph, n_copies: int) -> OrbGraph:
    """``n_copies`` copies of the whole batch as one disjoint graph (copy-major order)."""
    return batch_orb_graphs([graph] * n_copies)
