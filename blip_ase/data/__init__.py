"""Atoms -> graphs (matscipy neighbour lists) and dataset readers."""

from blip_ase.data.graph import AtomGraph, atoms_to_graph, batch_graphs

__all__ = ["AtomGraph", "atoms_to_graph", "batch_graphs"]
