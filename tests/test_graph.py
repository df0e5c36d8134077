"""Atoms -> graph: validation messages, neighbour lists, canonical edge order, batching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list

from blip_ase.bayes import NoiseSource
from blip_ase.data.graph import atoms_to_graph, batch_graphs
from blip_ase.models import PaiNNPotential

ELEMENTS = [1, 7, 42]
CUTOFF = 4.0


def _brute_force_pairs(atoms: Atoms, cutoff: float, reach: int = 2) -> dict[tuple, np.ndarray]:
    """All ``(i, j, shift) -> r_j - r_i + shift @ cell`` with 0 < |r| < cutoff, by enumeration."""
    pos, cell = atoms.positions, atoms.cell.array
    pairs = {}
    for shift in itertools.product(range(-reach, reach + 1), repeat=3):
        offset = np.asarray(shift) @ cell
        for i in range(len(atoms)):
            for j in range(len(atoms)):
                vector = pos[j] - pos[i] + offset
                if 0 < np.linalg.norm(vector) < cutoff:
                    pairs[(i, j, *shift)] = vector
    return pairs


def test_periodic_edges_equal_a_brute_force_enumeration(mo_cell):
    assert min(np.linalg.norm(mo_cell.cell.array, axis=1)) > CUTOFF / 2, "reach=2 covers the cutoff"
    graph = atoms_to_graph(mo_cell, cutoff=CUTOFF, elements=ELEMENTS)
    vectors = PaiNNPotential.edge_vectors(graph, graph.positions, graph.cell)
    got = {
        (int(i), int(j), *map(int, s)): v.numpy()
        for i, j, s, v in zip(graph.edge_index[0], graph.edge_index[1], graph.cell_shifts, vectors)
    }
    expected = _brute_force_pairs(mo_cell, CUTOFF)
    assert len(got) == graph.edge_index.shape[1], "no duplicate edges"
    assert got.keys() == expected.keys()
    for key, vector in expected.items():
        np.testing.assert_allclose(got[key], vector, atol=1e-12)
    assert len(neighbor_list("i", mo_cell, CUTOFF)) == len(expected)


def test_molecule_edges_are_all_pairs_within_the_cutoff(mixed_molecule):
    graph = atoms_to_graph(mixed_molecule, cutoff=2.2, elements=ELEMENTS)
    d = mixed_molecule.get_all_distances()
    expected = {(i, j) for i in range(4) for j in range(4) if i != j and d[i, j] < 2.2}
    assert expected != {(i, j) for i in range(4) for j in range(4) if i != j}, "cutoff should exclude a pair"
    assert set(map(tuple, graph.edge_index.T.tolist())) == expected
    assert torch.count_nonzero(graph.cell_shifts) == 0


def test_edges_are_sorted_by_receiver_sender_and_shift(mo_cell):
    graph = atoms_to_graph(mo_cell, cutoff=CUTOFF, elements=ELEMENTS)
    keys = [(int(i), int(j), *map(int, s)) for i, j, s in zip(*graph.edge_index, graph.cell_shifts)]
    assert keys == sorted(keys)


def test_rotating_and_translating_a_molecule_keeps_the_edge_order(ammonia, rotation):
    """Rotation and translation change matscipy's internal order; sorting restores it."""
    moved = ammonia.copy()
    moved.positions = ammonia.positions @ rotation.T + 5.0
    a = atoms_to_graph(ammonia, cutoff=CUTOFF, elements=ELEMENTS)
    b = atoms_to_graph(moved, cutoff=CUTOFF, elements=ELEMENTS)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.cell_shifts, b.cell_shifts)


def test_graph_tensors_have_the_documented_shapes_and_types(mo_cell):
    graph = atoms_to_graph(mo_cell, cutoff=CUTOFF, elements=ELEMENTS)
    n, e = len(mo_cell), graph.edge_index.shape[1]
    assert graph.species.dtype == torch.long and torch.all(graph.species == 2)
    assert graph.positions.shape == (n, 3) and graph.positions.dtype == torch.float64
    assert graph.cell_shifts.shape == (e, 3)
    assert graph.cell.shape == (1, 3, 3) and graph.pbc.shape == (1, 3)
    assert graph.periodic and graph.n_graphs == 1 and graph.n_atoms.tolist() == [n]


def test_unknown_element_error_lists_the_model_elements():
    with pytest.raises(ValueError) as info:
        atoms_to_graph(Atoms("HAu", positions=[[0, 0, 0], [0, 0, 1.5]]), cutoff=CUTOFF, elements=ELEMENTS)
    message = str(info.value)
    assert "Au" in message
    for symbol in ("'H'", "'N'", "'Mo'"):
        assert symbol in message.split("knows only")[1]


def test_nan_positions_are_rejected_with_the_atom_index(ammonia):
    ammonia.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite .*\[2\]"):
        atoms_to_graph(ammonia, cutoff=CUTOFF, elements=ELEMENTS)


def test_empty_atoms_are_rejected():
    with pytest.raises(ValueError, match="no atoms"):
        atoms_to_graph(Atoms(), cutoff=CUTOFF, elements=ELEMENTS)


@pytest.mark.parametrize(
    "cell", [np.zeros((3, 3)), [[3.0, 0, 0], [6.0, 0, 0], [0, 0, 3.0]]], ids=["zero-cell", "collinear-vectors"]
)
def test_zero_volume_periodic_cell_is_rejected(cell):
    atoms = Atoms("Mo2", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], cell=cell, pbc=True)
    with pytest.raises(ValueError, match="zero volume"):
        atoms_to_graph(atoms, cutoff=CUTOFF, elements=ELEMENTS)


def test_nan_cell_is_rejected():
    atoms = Atoms("Mo", positions=[[0, 0, 0]], cell=[[np.nan, 0, 0], [0, 3, 0], [0, 0, 3]], pbc=True)
    with pytest.raises(ValueError, match="cell contains NaN"):
        atoms_to_graph(atoms, cutoff=CUTOFF, elements=ELEMENTS)


def test_isolated_atoms_give_a_valid_graph_with_zero_forces(bayesian_potential):
    atoms = Atoms("MoN", positions=[[0, 0, 0], [0, 0, 10.0]])
    model = bayesian_potential
    graph = model.build_graph(atoms)
    assert graph.edge_index.shape == (2, 0)
    c = model.coefficients(graph)
    for noise in (None, NoiseSource.from_seeds([1, 2])):
        out = model(graph, coefficients=c, noise=noise)
        assert torch.isfinite(out["energy"]).all()
        assert torch.equal(out["forces"], torch.zeros_like(out["forces"]))


def test_an_isolated_atom_has_exactly_its_reference_energy_in_map_mode(bayesian_potential):
    """The lone-atom network output is subtracted per element; sampling keeps the atom's own update noise."""
    model = bayesian_potential
    model.reference_energies.copy_(torch.tensor([-13.6, -54.0, -1090.5], dtype=torch.float64))
    for symbol, e_ref in (("H", -13.6), ("Mo", -1090.5)):
        out = model(model.build_graph(Atoms(symbol)))
        torch.testing.assert_close(out["energy"], torch.full_like(out["energy"], e_ref), rtol=0, atol=1e-10)


def test_batch_graphs_offsets_edges_and_graph_indices(ammonia, mo_cell):
    a = atoms_to_graph(ammonia, cutoff=CUTOFF, elements=ELEMENTS)
    b = atoms_to_graph(mo_cell, cutoff=CUTOFF, elements=ELEMENTS)
    batch = batch_graphs([a, b, a])
    n_a, n_b, e_a, e_b = len(ammonia), len(mo_cell), a.edge_index.shape[1], b.edge_index.shape[1]
    assert batch.n_graphs == 3 and batch.n_atoms.tolist() == [n_a, n_b, n_a]
    assert batch.batch.tolist() == [0] * n_a + [1] * n_b + [2] * n_a
    assert torch.equal(batch.edge_index[:, e_a : e_a + e_b], b.edge_index + n_a)
    assert torch.equal(batch.edge_index[:, e_a + e_b :], a.edge_index + n_a + n_b)
    assert not batch.periodic


def test_replicate_makes_disjoint_copy_major_copies(ammonia):
    graph = atoms_to_graph(ammonia, cutoff=CUTOFF, elements=ELEMENTS)
    copies = graph.replicate(3)
    n, e = len(ammonia), graph.edge_index.shape[1]
    assert copies.n_graphs == 3 and copies.positions.shape == (3 * n, 3)
    assert torch.equal(copies.edge_index[:, 2 * e :], graph.edge_index + 2 * n)
    assert copies.batch.tolist() == [0] * n + [1] * n + [2] * n
