"""KL divergence of the variational adaptive dropout posterior to the dropout prior.

For ``q = N(theta, alpha theta^2)`` and ``p = N(0, alpha0 theta^2)`` with
``alpha0 = p0 / (1 - p0)``, per coefficient (paper, appendix A.1, with the factor 1/2 of
the Gaussian KL written out):

    KL = 0.5 * ((alpha + 1) / alpha0 + log(alpha0) - log(alpha) - 1)
"""

from __future__ import annotations

import math

import torch

from blip_ase.bayes.posterior import Coefficients


def kl_per_coefficient(alpha: torch.Tensor, p0: float) -> torch.Tensor:
    """Elementwise KL for coefficients ``alpha`` (any shape) against prior dropout rate ``p0``."""
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"prior dropout probability p0 must be in (0, 1), got {p0}")
    alpha0 = p0 / (1.0 - p0)
    alpha = alpha.clamp_min(1e-12)
    return 0.5 * ((alpha + 1.0) / alpha0 + math.log(alpha0) - torch.log(alpha) - 1.0)


def kl_divergence(
    coefficients: Coefficients, p0: float, *, weights: tuple[float, float] = (1.0, 1.0),
    edge_mask: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """KL averaged over edges (nodes) and summed over Bayesian layers; a scalar tensor.

    Multiply by lambda in the loss. ``weights`` multiply the edge and the node average
    (distributed training: this process's share of the global batch's average; a weight of 1,
    as in one process, adds no operation). ``edge_mask (n_edges,)``: only these edges' KL
    counts, still divided by the number of all edges (each kept edge weighs as without a mask).
    """
    total = coefficients.edge.new_zeros(())
    for block, weight in zip((coefficients.edge, coefficients.node), weights):
        if block.numel():
            per = kl_per_coefficient(block, p0)
            if edge_mask is not None and block is coefficients.edge:
                per = per * edge_mask.to(per)[:, None]
            kl = per.mean(dim=0).sum()
            total = total + (kl if weight == 1.0 else weight * kl)
    return total
