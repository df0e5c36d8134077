"""PaiNN potential with BLIP noise: derivatives, symmetry, seeds, batching, MAP equivalence."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from blip_ase.bayes import BayesConfig, Coefficients, NoiseSource
from blip_ase.data.graph import AtomGraph, batch_graphs

SEEDS = [11, 12, 13]


def _noise(seeds):
    return None if seeds is None else NoiseSource.from_seeds(seeds)


def _energy(model, graph: AtomGraph, coefficients, seeds) -> torch.Tensor:
    """``(S,)`` energies of the first structure with fresh generators for ``seeds``;
    ``coefficients="recompute"`` runs the inference network on this very geometry."""
    if isinstance(coefficients, str):
        coefficients = model.coefficients(graph)
    out = model(graph, coefficients=coefficients, noise=_noise(seeds), compute_forces=False)
    return out["energy"][:, 0].detach()


def _numerical_forces(model, graph, coefficients, seeds, h=1e-5) -> torch.Tensor:
    """Central differences ``-dE/dr``, ``(S, N, 3)``, at fixed coefficients and noise."""
    n = graph.positions.shape[0]
    columns = []
    for a in range(n):
        for k in range(3):
            energies = []
            for sign in (1.0, -1.0):
                pos = graph.positions.clone()
                pos[a, k] += sign * h
                energies.append(_energy(model, graph.with_positions(pos), coefficients, seeds))
            columns.append(-(energies[0] - energies[1]) / (2 * h))
    return torch.stack(columns, dim=-1).view(-1, n, 3)


def _numerical_stress(model, graph, coefficients, seeds, h=1e-5) -> torch.Tensor:
    """Central differences ``dE/d(strain) / V``, ``(S, 3, 3)``, deforming cell and positions."""
    volume = torch.linalg.det(graph.cell[0]).abs()
    stress = torch.zeros(len(seeds) if seeds else 1, 3, 3, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1.0, -1.0):
                deformation = torch.eye(3, dtype=torch.float64)
                deformation[a, b] += sign * h
                strained = replace(graph, positions=graph.positions @ deformation, cell=graph.cell @ deformation)
                energies.append(_energy(model, strained, coefficients, seeds))
            stress[:, a, b] = (energies[0] - energies[1]) / (2 * h) / volume
    return stress


@pytest.mark.parametrize("seeds", [None, SEEDS[:2]], ids=["map", "fixed-noise"])
def test_molecule_forces_equal_finite_differences(bayesian_potential, ammonia, seeds):
    """Forces of a sample are -dE/dr at fixed alpha, beta and eps (coefficients held fixed)."""
    model = bayesian_potential
    graph = model.build_graph(ammonia)
    c = model.coefficients(graph)
    forces = model(graph, coefficients=c, noise=_noise(seeds))["forces"].detach()
    assert forces.shape == (len(seeds) if seeds else 1, len(ammonia), 3)
    assert forces.abs().max() > 1e-3
    torch.testing.assert_close(forces, _numerical_forces(model, graph, c, seeds), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("seeds", [None, SEEDS[:2]], ids=["map", "fixed-noise"])
def test_periodic_forces_and_stress_equal_finite_differences(bayesian_potential, mo_cell, seeds):
    model = bayesian_potential
    graph = model.build_graph(mo_cell)
    c = model.coefficients(graph)
    out = model(graph, coefficients=c, noise=_noise(seeds), compute_stress=True)
    forces, stress = out["forces"].detach(), out["stress"][:, 0].detach()
    assert forces.abs().max() > 1e-3 and stress.abs().max() > 1e-4
    torch.testing.assert_close(forces, _numerical_forces(model, graph, c, seeds), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(stress, _numerical_stress(model, graph, c, seeds), rtol=1e-6, atol=1e-9)


def test_stress_of_every_sample_is_symmetric(bayesian_potential, mo_cell):
    """An antisymmetric strain is a rotation; a fixed-noise sample is rotation invariant."""
    model = bayesian_potential
    graph = model.build_graph(mo_cell)
    stress = model(graph, coefficients=model.coefficients(graph), noise=_noise(SEEDS), compute_stress=True)["stress"]
    torch.testing.assert_close(stress, stress.transpose(-1, -2), rtol=1e-9, atol=1e-12)


def test_rotating_and_translating_a_molecule_rotates_forces_of_every_sample(bayesian_potential, ammonia, rotation):
    model = bayesian_potential
    moved = ammonia.copy()
    moved.positions = ammonia.positions @ rotation.T + np.array([1.3, -0.7, 2.1])
    results = []
    for atoms in (ammonia, moved):
        graph = model.build_graph(atoms)
        c = model.coefficients(graph)
        results.append((graph, c, model(graph, coefficients=c, noise=_noise(SEEDS))))
    (g0, c0, out0), (g1, c1, out1) = results
    assert torch.equal(g0.edge_index, g1.edge_index), "edges must be canonically sorted"
    torch.testing.assert_close(c0.edge, c1.edge, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c0.node, c1.node, rtol=1e-10, atol=1e-12)
    assert out0["energy"].std() > 1e-4, "samples should differ from each other"
    torch.testing.assert_close(out1["energy"], out0["energy"], rtol=1e-10, atol=1e-10)
    rot = torch.as_tensor(rotation)
    torch.testing.assert_close(out1["forces"], out0["forces"] @ rot.T, rtol=1e-8, atol=1e-10)


def test_rotating_a_periodic_cell_rotates_forces_and_stress_of_every_sample(bayesian_potential, mo_cell, rotation):
    model = bayesian_potential
    moved = mo_cell.copy()
    moved.set_cell(mo_cell.cell.array @ rotation.T, scale_atoms=True)
    moved.positions += np.array([0.3, -0.2, 0.1])
    outs = []
    for atoms in (mo_cell, moved):
        graph = model.build_graph(atoms)
        outs.append(model(graph, coefficients=model.coefficients(graph), noise=_noise(SEEDS), compute_stress=True))
    rot = torch.as_tensor(rotation)
    torch.testing.assert_close(outs[1]["energy"], outs[0]["energy"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[1]["forces"], outs[0]["forces"] @ rot.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(outs[1]["stress"], rot @ outs[0]["stress"] @ rot.T, rtol=1e-8, atol=1e-10)


def _deterministic_twin(make_potential, bayesian):
    plain = make_potential(None)
    state = {k: v for k, v in bayesian.state_dict().items() if not k.startswith("posterior.")}
    plain.load_state_dict(state, strict=True)
    return plain


def test_net_state_dict_keys_are_the_same_with_and_without_bayesian_layers(make_potential, bayesian_potential):
    plain = make_potential(None)
    bayes_keys = {k for k in bayesian_potential.state_dict() if k.startswith("net.")}
    plain_keys = {k for k in plain.state_dict() if k.startswith("net.")}
    assert bayes_keys == plain_keys
    assert not any(k.startswith("posterior.") for k in plain.state_dict())


def test_map_output_equals_the_deterministic_model_with_plain_linears(make_potential, bayesian_potential, mo_cell):
    plain = _deterministic_twin(make_potential, bayesian_potential)
    assert not any("Bayesian" in type(m).__name__ for m in plain.modules())
    graph = bayesian_potential.build_graph(mo_cell)
    c = bayesian_potential.coefficients(graph)
    expected = plain(graph, compute_stress=True)
    for out in (bayesian_potential(graph, compute_stress=True), bayesian_potential(graph, coefficients=c, noise=None,
                                                                                   compute_stress=True)):
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)


def test_a_sample_differs_from_map(bayesian_potential, ammonia):
    """Guards the other tests against a model whose noise is invisible."""
    graph = bayesian_potential.build_graph(ammonia)
    sample = bayesian_potential(graph, coefficients=bayesian_potential.coefficients(graph), noise=_noise([5]))
    map_ = bayesian_potential(graph)
    assert (sample["energy"] - map_["energy"]).abs().max() > 1e-4
    assert (sample["forces"] - map_["forces"]).abs().max() > 1e-4


def test_zero_alpha_and_beta_give_samples_equal_to_map(bayesian_potential, mo_cell):
    graph = bayesian_potential.build_graph(mo_cell)
    c = bayesian_potential.coefficients(graph)
    zero = Coefficients(torch.zeros_like(c.edge), torch.zeros_like(c.node))
    out = bayesian_potential(graph, coefficients=zero, noise=_noise(SEEDS), compute_stress=True)
    map_ = bayesian_potential(graph, compute_stress=True)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(out[key], map_[key].expand_as(out[key]), rtol=1e-12, atol=1e-12)
        assert torch.isfinite(out[key]).all()


def test_dropout_clamped_to_zero_gives_zero_variance(make_potential, ammonia):
    model = make_potential(BayesConfig(p_min=0.0, p_init=0.0, p_max=0.0, hidden=8, n_hidden=1, n_rbf=6))
    graph = model.build_graph(ammonia)
    c = model.coefficients(graph)
    assert torch.count_nonzero(c.edge) == 0 and torch.count_nonzero(c.node) == 0
    out = model(graph, coefficients=c, noise=_noise(SEEDS))
    assert out["energy"].shape == (3, 1)
    torch.testing.assert_close(out["energy"].var(dim=0), torch.zeros(1, dtype=torch.float64), rtol=0, atol=1e-20)
    torch.testing.assert_close(out["forces"], model(graph)["forces"].expand(3, -1, -1), rtol=1e-12, atol=1e-12)


def test_same_seed_gives_identical_samples_and_another_seed_different_ones(bayesian_potential, mo_cell):
    graph = bayesian_potential.build_graph(mo_cell)
    c = bayesian_potential.coefficients(graph)

    def run(seeds):
        return bayesian_potential(graph, coefficients=c, noise=_noise(seeds), compute_stress=True)

    first, again, other = run([7, 8]), run([7, 8]), run([9, 10])
    for key in ("energy", "forces", "stress"):
        assert torch.equal(first[key], again[key])
        assert (first[key] - other[key]).abs().max() > 1e-6
    assert (first["energy"][0] - first["energy"][1]).abs() > 1e-6, "samples within a pass must differ"


@pytest.mark.parametrize("prepared", [True, False], ids=["noise-drawn-up-front", "noise-drawn-per-layer"])
def test_batched_samples_equal_sequential_passes_with_the_same_noise(bayesian_potential, mo_cell, prepared, monkeypatch):
    if not prepared:  # as for a structure too large to draw its noise up front
        monkeypatch.setattr("blip_ase.bayes.wrap.PREPARE_LIMIT", 0)
    model = bayesian_potential
    graph = model.build_graph(mo_cell)
    c = model.coefficients(graph)
    batched = model(graph, coefficients=c, noise=_noise(SEEDS), compute_stress=True)
    assert batched["energy"].shape == (3, 1)
    assert batched["forces"].shape == (3, len(mo_cell), 3)
    assert batched["stress"].shape == (3, 1, 3, 3)
    for s, seed in enumerate(SEEDS):
        alone = model(graph, coefficients=c, noise=_noise([seed]), compute_stress=True)
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(batched[key][s], alone[key][0], rtol=1e-10, atol=1e-12)


def test_inference_network_runs_once_per_configuration_for_a_batched_mc_pass(bayesian_potential, mo_cell):
    """``forward`` must use the coefficients it is given and never call the posterior itself."""
    model = bayesian_potential
    calls = []
    handle = model.posterior.register_forward_hook(lambda *args: calls.append(1))
    try:
        graph = model.build_graph(mo_cell)
        c = model.coefficients(graph)
        assert len(calls) == 1
        out = model(graph, coefficients=c, noise=_noise(SEEDS), compute_stress=True)
        assert len(calls) == 1
        # Given zero coefficients, forward must return MAP: it did not recompute its own.
        zero = Coefficients(torch.zeros_like(c.edge), torch.zeros_like(c.node))
        silent = model(graph, coefficients=zero, noise=_noise(SEEDS))
        assert len(calls) == 1
    finally:
        handle.remove()
    map_energy = model(graph)["energy"]
    assert (out["energy"] - map_energy).abs().max() > 1e-4
    torch.testing.assert_close(silent["energy"], map_energy.expand(3, 1), rtol=1e-12, atol=1e-12)


def test_a_deterministic_model_ignores_noise_and_returns_map(make_potential, ammonia):
    model = make_potential(None)
    graph = model.build_graph(ammonia)
    assert model.coefficients(graph) is None
    out = model(graph, coefficients=None, noise=_noise(SEEDS))
    assert out["energy"].shape == (1, 1)
    torch.testing.assert_close(out["forces"], model(graph)["forces"], rtol=0, atol=0)


def test_batching_does_not_mix_systems_in_map_mode(bayesian_potential, ammonia, mo_cell, mixed_molecule):
    model = bayesian_potential
    systems = [ammonia, mo_cell, mixed_molecule]
    graphs = [model.build_graph(a) for a in systems]
    batch = batch_graphs(graphs)
    out = model(batch)
    assert out["energy"].shape == (1, 3)
    alone = [model(g) for g in graphs]
    torch.testing.assert_close(out["energy"][0], torch.cat([o["energy"][0] for o in alone]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["forces"], torch.cat([o["forces"] for o in alone], dim=1), rtol=1e-10, atol=1e-12)
    c = model.coefficients(batch)
    parts = [model.coefficients(g) for g in graphs]
    torch.testing.assert_close(c.edge, torch.cat([p.edge for p in parts]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.node, torch.cat([p.node for p in parts]), rtol=1e-12, atol=1e-12)


def test_batching_periodic_cells_gives_each_its_own_stress(bayesian_potential, mo_cell):
    model = bayesian_potential
    other = mo_cell.copy()
    other.set_cell(mo_cell.cell.array * 1.03, scale_atoms=True)
    graphs = [model.build_graph(a) for a in (mo_cell, other)]
    out = model(batch_graphs(graphs), compute_stress=True)
    alone = [model(g, compute_stress=True) for g in graphs]
    assert (alone[0]["stress"] - alone[1]["stress"]).abs().max() > 1e-4
    torch.testing.assert_close(out["stress"][0], torch.cat([o["stress"][0] for o in alone]), rtol=1e-10, atol=1e-12)


def test_moving_one_structure_of_a_batch_leaves_the_samples_of_the_others_unchanged(
    bayesian_potential, ammonia, mo_cell
):
    model = bayesian_potential
    batch = batch_graphs([model.build_graph(ammonia), model.build_graph(mo_cell)])
    c = model.coefficients(batch)
    n_nh3 = len(ammonia)
    moved_pos = batch.positions.clone()
    moved_pos[:n_nh3] += torch.tensor([0.02, -0.03, 0.01], dtype=torch.float64) * torch.arange(n_nh3)[:, None]
    before = model(batch, coefficients=c, noise=_noise(SEEDS))
    after = model(batch.with_positions(moved_pos), coefficients=c, noise=_noise(SEEDS))
    assert (after["energy"][:, 0] - before["energy"][:, 0]).abs().max() > 1e-5
    torch.testing.assert_close(after["energy"][:, 1], before["energy"][:, 1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after["forces"][:, n_nh3:], before["forces"][:, n_nh3:], rtol=1e-10, atol=1e-12)


def test_the_cached_lone_atom_output_follows_new_weights_in_eval_mode(make_potential, bayesian_potential):
    """MAP dynamics cache the lone-atom term; loading other weights must not reuse a stale one."""
    from ase import Atoms

    model = bayesian_potential.eval()
    graph = model.build_graph(Atoms("Mo"))
    model(graph)
    other = make_potential(seed=1).eval()
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(model.lone_atom_output(), other.lone_atom_output(), rtol=0, atol=0)
    assert float(model(graph)["energy"]) == pytest.approx(float(model.reference_energies[2]), abs=1e-12)


def test_sample_forces_and_stress_are_full_derivatives_when_alpha_is_recomputed(bayesian_potential, mo_cell):
    """A sample's energy as a function of positions includes alpha(positions): the analytic
    forces and stress (inference network run once) equal differences that rerun it."""
    model = bayesian_potential
    graph = model.build_graph(mo_cell)
    c = model.coefficients(graph)
    assert c.edge_jacobian.abs().max() > 1e-4, "alpha must depend on the geometry for this test"
    out = model(graph, coefficients=c, noise=_noise(SEEDS[:2]), compute_stress=True)
    torch.testing.assert_close(out["forces"], _numerical_forces(model, graph, "recompute", SEEDS[:2]), rtol=0, atol=1e-7)
    numerical = _numerical_stress(model, graph, "recompute", SEEDS[:2])
    torch.testing.assert_close(out["stress"][:, 0], numerical, rtol=0, atol=1e-8)


def test_training_mode_reruns_the_inference_network_inside_the_pass_with_exact_forces(bayesian_potential, ammonia):
    """Training differentiates forces once more; there the network runs on the pass's own
    edge vectors instead of carrying its Jacobian, and sample forces stay full derivatives."""
    model = bayesian_potential.train()
    graph = model.build_graph(ammonia)
    c = model.coefficients(graph)
    assert c.edge_jacobian is None
    out = model(graph, coefficients=c, noise=_noise(SEEDS[:2]), create_graph=True)
    assert out["forces"].requires_grad
    numerical = _numerical_forces(model, graph, "recompute", SEEDS[:2])
    torch.testing.assert_close(out["forces"].detach(), numerical, rtol=0, atol=1e-7)
    model.eval()
    c_eval = model.coefficients(graph)
    torch.testing.assert_close(c_eval.edge, c.edge.detach(), rtol=1e-12, atol=1e-14)
