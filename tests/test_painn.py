"""PaiNN potential with BLIP noise: what is specific to PaiNN and its graphs (derivatives,
symmetry, seeds, batched samples and MAP equivalence are in the contract battery,
tests/test_backends.py)."""

from __future__ import annotations

import pytest
import torch

from blip_ase import testing
from blip_ase.bayes import BayesConfig, Coefficients, NoiseSource
from blip_ase.data.graph import batch_graphs

SEEDS = [11, 12, 13]


def _noise(seeds):
    return None if seeds is None else NoiseSource.from_seeds(seeds)


def test_stress_of_every_sample_is_symmetric(bayesian_potential, mo_cell):
    """An antisymmetric strain is a rotation; a fixed-noise sample is rotation invariant."""
    model = bayesian_potential
    graph = model.build_graph(mo_cell)
    stress = model(graph, coefficients=model.coefficients(graph), noise=_noise(SEEDS), compute_stress=True)["stress"]
    torch.testing.assert_close(stress, stress.transpose(-1, -2), rtol=1e-9, atol=1e-12)


def test_net_state_dict_keys_are_the_same_with_and_without_bayesian_layers(make_potential, bayesian_potential):
    plain = make_potential(None)
    bayes_keys = {k for k in bayesian_potential.state_dict() if k.startswith("net.")}
    plain_keys = {k for k in plain.state_dict() if k.startswith("net.")}
    assert bayes_keys == plain_keys
    assert not any(k.startswith("posterior.") for k in plain.state_dict())


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


def test_batched_samples_equal_sequential_passes_also_when_noise_is_drawn_per_layer(
    bayesian_potential, mo_cell, monkeypatch
):
    """As for a structure too large to draw its noise up front (the battery covers the other case)."""
    monkeypatch.setattr("blip_ase.bayes.linear.PREPARE_LIMIT", 0)
    testing.check_batched_samples_equal_sequential(bayesian_potential, mo_cell, seeds=SEEDS, rtol=1e-10, atol=1e-12)


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


def test_training_mode_reruns_the_inference_network_inside_the_pass_with_exact_forces(bayesian_potential, mo_cell):
    """Training differentiates forces once more; there the network runs on the pass's own
    edge vectors instead of carrying its Jacobian, and sample forces and stress stay full
    derivatives of the sample energy."""
    model = bayesian_potential.train()
    graph = model.build_graph(mo_cell)
    c = model.coefficients(graph)
    assert c.edge_jacobian is None
    testing.check_forces_match_finite_differences(model, mo_cell, seed=11, recompute=True, eps=1e-5)
    testing.check_stress_matches_finite_differences(model, mo_cell, seed=11, recompute=True, atol=1e-8)
    model.eval()
    torch.testing.assert_close(model.coefficients(graph).edge, c.edge.detach(), rtol=1e-12, atol=1e-14)


def test_samples_that_share_their_radial_filters_equal_samples_that_compute_their_own(
    bayesian_potential, mo_cell, monkeypatch
):
    """A prediction computes the radial filters once for its S copies (PaiNN.filters); energies,
    forces and stress must equal those of S copies that each compute their own, and the shared
    path must really be taken (its derivative function is called)."""
    from blip_ase.models import painn

    model = bayesian_potential.eval()
    graph = model.build_graph(mo_cell)
    coefficients = model.coefficients(graph)
    calls = []
    original = painn._SharedEdgeValues.backward
    counted = staticmethod(lambda ctx, grad: calls.append(1) or original(ctx, grad))
    monkeypatch.setattr(painn._SharedEdgeValues, "backward", counted)
    shared = model.predict(graph, coefficients=coefficients, noise=_noise(SEEDS), compute_stress=True)
    assert calls, "the shared filters were not used"
    monkeypatch.setattr(painn.PaiNN, "filters", lambda self, distance, copies: self.radial_filters(distance))
    own = model.predict(graph, coefficients=coefficients, noise=_noise(SEEDS), compute_stress=True)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(shared[key], own[key], rtol=1e-10, atol=1e-12)
