"""Noise-contrastive prior: the KL of unlabelled, perturbed copies of the training batch.

The ELBO's KL acts only on training structures, where the data term pulls alpha down, so
nothing tells the inference network to predict *more* noise anywhere else. Here the KL to the
prior is also evaluated on perturbed copies of each batch (every atom rattled by a Gaussian of
a random width, every structure uniformly stretched or compressed: the geometries hot MD
visits), with its own weight. With a small weight on the training structures the network then
learns little noise where data exist and the prior's noise away from them (noise-contrastive
priors, Hafner et al. 2019). No labels and no pass of the potential are needed: only the
inference network runs on the perturbed edge vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blip_ase.bayes import Coefficients, PosteriorInputs, kl_divergence


@dataclass(frozen=True)
class ContrastiveConfig:
    """Perturbed copies on which the KL to the prior is evaluated (BLIP only: models without an
    inference network, deterministic or MC dropout, ignore it).

    Attributes:
        weight: weight of their KL in the loss (0: off). It is independent of ``bayes.kl_weight``,
            the weight of the KL on the training structures themselves.
        rattle_A: largest per-structure rattle width (A); each copy draws its width uniformly in
            ``[rattle_min_A, rattle_A]`` and moves every atom by a Gaussian of that standard
            deviation.
        rattle_min_A: smallest rattle width (A): copies closer to the data than this are not drawn.
        stretch: largest uniform stretch or compression; each copy scales all its edge vectors by
            a factor drawn uniformly in ``[1 - stretch, 1 + stretch]``.
        copies: perturbed copies per training structure and step.
        seed: seed of the perturbations (a generator of their own: the labelled batch, its
            order and its training noise are the same with or without them).
    """

    weight: float = 0.0
    rattle_A: float = 0.3
    rattle_min_A: float = 0.0
    stretch: float = 0.15
    copies: int = 1
    seed: int = 12345

    def __post_init__(self):
        rattle_ok = 0 <= self.rattle_min_A <= self.rattle_A
        if self.weight < 0 or not rattle_ok or not 0 <= self.stretch < 1 or self.copies < 1:
            raise ValueError(
                f"contrastive needs weight >= 0, 0 <= rattle_min_A <= rattle_A, 0 <= stretch < 1 and copies >= 1, "
                f"got {self}"
            )


def perturb_edge_vectors(x: PosteriorInputs, cfg: ContrastiveConfig, generator: torch.Generator) -> torch.Tensor:
    """``(E, 3)`` edge vectors of one perturbed copy of every structure in ``x``.

    Atom ``a`` of structure ``g`` moves by ``sigma_g * z_a`` (``z`` standard normal, ``sigma_g``
    uniform in ``[rattle_min_A, rattle_A]``) and every vector of ``g`` is then scaled by ``s_g``: the
    vectors of a real geometry, whatever the backend's sign convention. Edges are kept (the
    inference network has no cutoff of its own). Random numbers come from ``generator`` only.
    """
    vec = x.edge_vector.detach()
    kw = {"generator": generator, "device": generator.device, "dtype": torch.float64}
    u = torch.rand(2, x.n_graphs, **kw)
    z = torch.randn(x.atom_graph.shape[0], 3, **kw)
    sigma = (cfg.rattle_min_A + (cfg.rattle_A - cfg.rattle_min_A) * u[0]).to(vec)
    scale = (1.0 + cfg.stretch * (2.0 * u[1] - 1.0)).to(vec)
    z = z.to(vec) * sigma[x.atom_graph, None]
    i, j = x.edge_index
    return scale[x.atom_graph[i], None] * (vec + z[j] - z[i])


def contrastive_kl(
    model, graph, cfg: ContrastiveConfig, generator: torch.Generator, p0: float, *,
    weights: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:  # fmt: skip
    """KL to the prior of alpha (and of beta, when the node head sees the neighbourhood) on
    ``cfg.copies`` perturbed copies of ``graph``, averaged over edges (nodes) and copies and
    summed over layers by :func:`~blip_ase.bayes.kl_divergence` (with its ``weights``); a scalar tensor."""
    x = model.posterior_inputs(graph)
    posterior = model.posterior
    total = x.edge_vector.new_zeros(())
    for _ in range(cfg.copies):
        c = posterior(x.species, x.edge_index, perturb_edge_vectors(x, cfg, generator))
        node = c.node if posterior.neighbourhood else c.node[:, :0]
        total = total + kl_divergence(Coefficients(c.edge, node), p0, weights=weights)
    return total / cfg.copies
