"""The BLIP method on its own: Bayesian linear layer, noise, inference network, KL, wrapping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence as torch_kl

from blip_ase.bayes import (
    BayesianLinear,
    Coefficients,
    InferenceNetwork,
    NoiseSource,
    StructureNoise,
    bayesian_layers,
    bayesianize,
    input_gradients_only,
    kl_divergence,
    kl_per_coefficient,
    noise_context,
)


def _layer(seed=0, role="edge"):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BayesianLinear(5, 4, role=role, column=0, dtype=torch.float64)


# --- Bayesian linear layer -------------------------------------------------------------------


def test_local_reparameterisation_has_the_documented_mean_and_variance():
    """Output ~ N(h W^T + b, alpha (h*h) (W*W)^T), checked over many draws."""
    layer = _layer()
    h = torch.tensor([[0.5, -1.0, 2.0, 0.1, 0.3], [1.5, 0.2, -0.4, 0.7, -1.1]], dtype=torch.float64)
    alpha = torch.tensor([[0.25], [1.5]], dtype=torch.float64)
    draws = 20000
    with torch.no_grad(), noise_context(
        layer, Coefficients(alpha.repeat(draws, 1), torch.zeros(0, 1)), NoiseSource.from_seeds([3])
    ):
        z = layer(h.repeat(draws, 1)).view(draws, 2, 4)
    mean = h @ layer.weight.T + layer.bias
    var = alpha * (h * h) @ (layer.weight * layer.weight).T
    std_error = (var / draws).sqrt()
    assert ((z.mean(0) - mean).abs() < 5 * std_error).all()
    torch.testing.assert_close(z.var(0), var, rtol=0.06, atol=0)


def test_noise_is_drawn_per_output_activation_not_shared_between_rows():
    layer = _layer()
    h = torch.ones(2, 5, dtype=torch.float64)
    alpha = torch.full((2, 1), 0.5, dtype=torch.float64)
    with torch.no_grad(), noise_context(layer, Coefficients(alpha, torch.zeros(0, 1)), NoiseSource.from_seeds([1])):
        z = layer(h)
    assert (z[0] - z[1]).abs().min() > 0


def test_bayesian_linear_outside_a_noise_context_is_exactly_nn_linear():
    layer = _layer()
    plain = nn.Linear(5, 4, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    h = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer(h), plain(h))


@pytest.mark.parametrize("bias", [True, False])
def test_bayesian_linear_state_dict_keys_equal_nn_linear(bias):
    plain = nn.Linear(5, 4, bias=bias)
    assert BayesianLinear(5, 4, bias, role="node", column=0).state_dict().keys() == plain.state_dict().keys()
    wrapped = BayesianLinear.from_linear(plain, role="node", column=0)
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    assert wrapped.weight is plain.weight, "from_linear must share parameters, not copy them"


def test_hand_written_backward_equals_autograd_and_refuses_second_derivatives():
    """Within input_gradients_only the layer's output, d/dh and d/d alpha (through the
    coefficient, as for position-dependent alpha) equal autograd's, rows with alpha = 0 included;
    parameters get no gradient and a second derivative raises."""
    layer = _layer()
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    alpha = torch.tensor([[0.3], [0.0], [1.2], [0.05], [0.7], [0.0]], dtype=torch.float64)
    upstream = torch.randn(6, 4, dtype=torch.float64, generator=gen)

    def run():
        x, a = h.clone().requires_grad_(), alpha.clone().requires_grad_()
        with noise_context(layer, Coefficients(a, torch.zeros(0, 1)), NoiseSource.from_seeds([5, 6, 7])):
            z = layer(x)
        return (z, *torch.autograd.grad((z * upstream).sum(), (x, a), create_graph=torch.is_grad_enabled()))

    reference = run()
    with input_gradients_only():
        fused = run()
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fused[2][[1, 5]].abs().max() == 0 and reference[2][[0, 2, 3, 4]].abs().min() > 0
    x = h.clone().requires_grad_()
    with input_gradients_only(), noise_context(layer, Coefficients(alpha, torch.zeros(0, 1)), NoiseSource.from_seeds([0])):
        z = layer(x)
    assert layer.weight.grad is None
    (grad,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        grad.sum().backward()


def test_coefficient_rows_must_match_input_rows():
    layer = _layer()
    alpha = torch.full((3, 1), 0.5, dtype=torch.float64)
    with noise_context(layer, Coefficients(alpha, torch.zeros(0, 1)), NoiseSource.from_seeds([0])):
        with pytest.raises(RuntimeError, match="2 input rows but 3 edge coefficients"):
            layer(torch.ones(2, 5, dtype=torch.float64))


def test_noise_context_restores_map_mode_on_exit_even_after_an_error():
    layer = _layer()
    alpha = torch.full((2, 1), 0.5, dtype=torch.float64)
    with pytest.raises(KeyError):
        with noise_context(layer, Coefficients(alpha, torch.zeros(0, 1)), NoiseSource.from_seeds([0])):
            assert layer.noise is not None and layer.coefficient is not None
            raise KeyError("boom")
    assert layer.noise is None and layer.coefficient is None


# --- Noise source ----------------------------------------------------------------------------


def test_noise_source_draws_sample_blocks_from_their_own_generator():
    both = NoiseSource.from_seeds([4, 9]).draw(6, 3, dtype=torch.float64, device=torch.device("cpu"))
    first = NoiseSource.from_seeds([4]).draw(3, 3, dtype=torch.float64, device=torch.device("cpu"))
    second = NoiseSource.from_seeds([9]).draw(3, 3, dtype=torch.float64, device=torch.device("cpu"))
    assert torch.equal(both, torch.cat([first, second]))


def test_prepared_noise_is_handed_out_in_pieces_and_stays_per_sample():
    """Prepared draws (one generator call per sample) still equal the samples drawn one by one,
    all pieces differ, and a draw beyond the prepared share is filled on its own."""
    cpu = torch.device("cpu")

    def pieces(seeds):
        src = NoiseSource.from_seeds(seeds)
        src.prepare([("edge", 5, 2), ("node", 1, 3)], dtype=torch.float64)
        s = len(seeds)
        return [src.draw(5 * s, 2, dtype=torch.float64, device=cpu), src.draw(s, 3, dtype=torch.float64, device=cpu),
                src.draw(2 * s, 4, dtype=torch.float64, device=cpu)]  # the last one is not prepared

    both, first, second = pieces([4, 9]), pieces([4]), pieces([9])
    for b, f, s in zip(both, first, second):
        n = f.shape[0]
        assert torch.equal(b, torch.cat([f, s])) and b.shape == (2 * n, f.shape[1])
    numbers = torch.cat([p.flatten() for p in both])
    assert len(torch.unique(numbers)) == numbers.numel()


@pytest.mark.parametrize("prepared", [False, True], ids=["drawn-per-layer", "prepared"])
def test_structure_noise_of_a_batch_equals_each_structure_alone(prepared):
    """Each structure of each sample draws from its own generator, prepared or not: a batch's
    noise rows are the structures' own rows, concatenated per sample; all numbers differ."""
    cpu, f64 = torch.device("cpu"), torch.float64
    edges, nodes = [6, 2, 4], [3, 1, 2]
    seeds = [[10, 11, 12], [20, 21, 22]]  # [sample][structure]
    layout = [("edge", sum(edges), 2), ("node", sum(nodes), 3)]

    def draws(rows_seeds, e, n):
        src = StructureNoise([[torch.Generator().manual_seed(x) for x in row] for row in rows_seeds], e, n)
        if prepared:
            src.prepare(layout, dtype=f64)
        s = len(rows_seeds)
        return src.draw(s * sum(e), 2, dtype=f64, device=cpu, role="edge"), src.draw(
            s * sum(n), 3, dtype=f64, device=cpu, role="node"
        )

    batch = draws(seeds, edges, nodes)
    alone = [draws([[row[g]] for row in seeds], [edges[g]], [nodes[g]]) for g in range(3)]
    for k, counts in ((0, edges), (1, nodes)):
        expected = torch.cat([alone[g][k][s * c : (s + 1) * c] for s in range(2) for g, c in enumerate(counts)])
        assert torch.equal(batch[k], expected)
    numbers = torch.cat([b.flatten() for b in batch])
    assert len(torch.unique(numbers)) == numbers.numel()
    with pytest.raises(ValueError, match="cannot split 5 edge rows"):
        StructureNoise([[torch.Generator()]], [3], [1]).draw(5, 2, dtype=f64, device=cpu, role="edge")


def test_noise_source_rejects_no_generators_and_rows_not_divisible_by_samples():
    with pytest.raises(ValueError, match="at least one generator"):
        NoiseSource([])
    with pytest.raises(ValueError, match="cannot be split into 2 samples"):
        NoiseSource.from_seeds([1, 2]).draw(5, 3, dtype=torch.float64, device=torch.device("cpu"))


def test_spawned_noise_sources_are_reproducible_from_one_generator():
    a = NoiseSource.spawn(torch.Generator().manual_seed(5), 3)
    b = NoiseSource.spawn(torch.Generator().manual_seed(5), 3)
    c = NoiseSource.spawn(torch.Generator().manual_seed(6), 3)
    draw = lambda src: src.draw(6, 2, dtype=torch.float64, device=torch.device("cpu"))  # noqa: E731
    x, y, z = draw(a), draw(b), draw(c)
    assert torch.equal(x, y) and not torch.equal(x, z)
    assert a.split(1, 3).n_samples == 2


# --- Inference network -----------------------------------------------------------------------


def _posterior(**kwargs):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return InferenceNetwork(3, 2, 3, cutoff=4.0, hidden=8, n_hidden=1, n_rbf=6, **kwargs).double()


def _edges():
    species = torch.tensor([0, 1, 2, 1])
    edge_index = torch.tensor([[0, 1, 2, 3, 0], [1, 0, 3, 2, 2]])
    vectors = torch.tensor(
        [[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 2.5, 0.3], [0.0, -2.5, -0.3], [0.5, 0.5, 3.0]], dtype=torch.float64
    )
    return species, edge_index, vectors


def test_inference_network_starts_at_p_init_with_one_column_per_layer():
    net = _posterior(p_init=0.2)
    c = net(*_edges())
    assert c.edge.shape == (5, 2) and c.node.shape == (4, 3)
    torch.testing.assert_close(c.edge, torch.full_like(c.edge, 0.25))
    torch.testing.assert_close(c.node, torch.full_like(c.node, 0.25))


def test_inference_network_clamps_dropout_probability_to_p_min_p_max():
    net = _posterior(p_min=0.05, p_max=0.5, p_init=0.2)
    for head in (net.edge_head, net.node_head):
        nn.init.normal_(head[-1].weight, std=50.0)
    c = net(*_edges())
    for block in (c.edge, c.node):
        p = block / (1 + block)
        assert (p >= 0.05 - 1e-12).all() and (p <= 0.5 + 1e-12).all()
        assert p.min() < 0.05 + 1e-9 or p.max() > 0.5 - 1e-9, "clamp should be active for such large logits"


def test_inference_network_output_is_rotation_invariant_and_its_jacobian_is_exact():
    """alpha depends on each edge's own vector; edge_jacobian gives d alpha / d vector."""
    from blip_ase.bayes import edge_jacobian

    net = _posterior(p_init=0.2)
    nn.init.normal_(net.edge_head[-1].weight, std=0.5)
    species, edge_index, vectors = _edges()
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    vectors.requires_grad_(True)
    c = net(species, edge_index, vectors)
    torch.testing.assert_close(net(species, edge_index, vectors @ q.T).edge, c.edge)
    assert c.edge.std() > 1e-4, "alpha should vary per edge here"
    jac = edge_jacobian(c.edge, vectors, create_graph=False)
    h = 1e-6
    for k in range(3):
        step = torch.zeros_like(vectors)
        step[:, k] = h
        with torch.no_grad():
            numeric = (net(species, edge_index, vectors + step).edge - net(species, edge_index, vectors - step).edge) / (2 * h)
        torch.testing.assert_close(jac[:, :, k], numeric, rtol=1e-6, atol=1e-9)
    assert jac.abs().max() > 1e-4


@pytest.mark.parametrize("p_min, p_init, p_max", [(0.3, 0.2, 0.8), (0.0, 0.9, 0.8), (0.0, 0.5, 1.0)])
def test_inference_network_rejects_inconsistent_dropout_bounds(p_min, p_init, p_max):
    with pytest.raises(ValueError, match="p_min <= p_init <= p_max"):
        InferenceNetwork(3, 1, 1, cutoff=4.0, p_min=p_min, p_init=p_init, p_max=p_max)


def test_coefficients_repeat_stacks_copies_sample_major():
    c = Coefficients(torch.arange(6.0).view(3, 2), torch.arange(2.0).view(2, 1))
    r = c.repeat(3)
    assert r.edge.shape == (9, 2) and r.node.shape == (6, 1)
    assert torch.equal(r.edge[3:6], c.edge) and torch.equal(r.node[4:], c.node)


# --- KL --------------------------------------------------------------------------------------


@pytest.mark.parametrize("p0", [0.5, 0.01, 0.9])
def test_kl_per_coefficient_equals_the_gaussian_kl_of_posterior_and_prior(p0):
    """KL(N(theta, alpha theta^2) || N(0, alpha0 theta^2)) is independent of theta."""
    alpha0 = p0 / (1 - p0)
    alpha = torch.tensor([1e-4, 0.01, 0.25, 1.0, 4.0], dtype=torch.float64)
    for theta in (0.3, -2.0):
        q = Normal(torch.full_like(alpha, theta), alpha.sqrt() * abs(theta))
        p = Normal(torch.zeros_like(alpha), torch.full_like(alpha, math.sqrt(alpha0) * abs(theta)))
        torch.testing.assert_close(kl_per_coefficient(alpha, p0), torch_kl(q, p))


def test_kl_per_coefficient_is_minimal_at_the_prior_coefficient():
    """The minimum is at alpha = alpha0, with value 1/(2 alpha0) (the means differ: theta vs 0)."""
    p0 = 0.2
    alpha0 = p0 / (1 - p0)
    alpha = torch.linspace(0.01, 2.0, 2001, dtype=torch.float64)
    kl = kl_per_coefficient(alpha, p0)
    assert abs(alpha[kl.argmin()].item() - alpha0) < 2e-3
    at_prior = kl_per_coefficient(torch.tensor([alpha0], dtype=torch.float64), p0)
    torch.testing.assert_close(at_prior, torch.tensor([0.5 / alpha0], dtype=torch.float64))


@pytest.mark.parametrize("p0", [0.0, 1.0, -0.1])
def test_kl_rejects_prior_dropout_outside_the_open_unit_interval(p0):
    with pytest.raises(ValueError, match="p0 must be in"):
        kl_per_coefficient(torch.ones(2), p0)


def test_kl_divergence_averages_over_rows_and_sums_over_layers():
    gen = torch.Generator().manual_seed(0)
    edge = torch.rand(7, 2, generator=gen, dtype=torch.float64) + 0.05
    node = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.05
    p0 = 0.5
    expected = sum(kl_per_coefficient(edge[:, k], p0).mean() for k in range(2)) + sum(
        kl_per_coefficient(node[:, k], p0).mean() for k in range(3)
    )
    total = kl_divergence(Coefficients(edge, node), p0)
    assert total.shape == ()
    torch.testing.assert_close(total, expected)
    # Doubling the rows with the same values leaves a mean unchanged.
    torch.testing.assert_close(kl_divergence(Coefficients(edge.repeat(2, 1), node), p0), expected)


def test_kl_divergence_skips_an_empty_block():
    node = torch.full((3, 1), 0.25, dtype=torch.float64)
    total = kl_divergence(Coefficients(torch.zeros(0, 2, dtype=torch.float64), node), 0.5)
    torch.testing.assert_close(total, kl_per_coefficient(node[0, 0], 0.5))


# --- Wrapping a model ------------------------------------------------------------------------


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.message = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 4))
        self.update = nn.Sequential(nn.Linear(4, 4))
        self.readout = nn.Linear(4, 1)


def test_bayesianize_wraps_matching_linears_and_keeps_parameters_and_keys():
    model = _Toy()
    keys, params = list(model.state_dict()), {n: p for n, p in model.named_parameters()}
    edge, node = bayesianize(model, edge_pattern=r"message\.\d+", node_pattern=r"update\.\d+")
    assert edge == ["message.0", "message.2"] and node == ["update.0"]
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    layers = bayesian_layers(model)
    assert [(m.role, m.column) for m in layers] == [("edge", 0), ("edge", 1), ("node", 0)]
    assert not isinstance(model.readout, BayesianLinear)


def test_bayesianize_names_the_patterns_when_nothing_matches():
    edge_pattern, node_pattern = r"nope\.\d+", r"never"
    with pytest.raises(ValueError, match="no nn.Linear") as info:
        bayesianize(_Toy(), edge_pattern=edge_pattern, node_pattern=node_pattern)
    assert repr(edge_pattern) in str(info.value) and repr(node_pattern) in str(info.value)


def test_bayesianize_rejects_a_linear_matching_both_patterns():
    with pytest.raises(ValueError, match="'update.0' matches both"):
        bayesianize(_Toy(), edge_pattern=r"(message|update)\.\d+", node_pattern=r"update\.\d+")
