"""MC dropout (Gal and Ghahramani 2016) on the same linears that BLIP makes Bayesian.

A :class:`DropoutLinear` drops each *input* unit of its row with a fixed probability ``p`` and
rescales the kept ones by ``1 / (1 - p)``: ``z = (h * mask / (1 - p)) @ theta.T + b``. Dropping
inputs is exactly Bernoulli noise on the rows of the weight matrix, the model of which BLIP's
Gaussian noise ``N(theta, alpha theta^2)`` is the Gaussian approximation, so the two methods
differ only in the noise and in BLIP's learned, input-dependent rate.

The masks of sample ``s`` come from ``NoiseSource.generators[s]`` only (a unit is kept when its
standard-normal draw is below ``Phi^-1(1 - p)``), so S samples in one batched pass equal S
sequential passes with the same generators, as for :class:`~blip_ase.bayes.linear.BayesianLinear`.
Sampling is switched on by the same :func:`~blip_ase.bayes.wrap.noise_context`; a dropout
model has no inference network, so its backend passes :func:`no_coefficients` (zero columns)
to say "sample". Outside a noise context the layer is exactly ``nn.Linear`` (MAP mode).
"""

from __future__ import annotations

from statistics import NormalDist

import torch
from torch import nn
from torch.nn import functional as F

from blip_ase.bayes.linear import BayesianLinear, Role
from blip_ase.bayes.posterior import Coefficients
from blip_ase.bayes.wrap import bayesianize


class DropoutLinear(BayesianLinear):
    """``nn.Linear`` with MC dropout of probability ``p`` on its inputs while sampling.

    Args:
        linear: the layer whose parameters are shared (not copied).
        role, column: as for :class:`BayesianLinear` (kept for a uniform interface; the dropout
            rate does not depend on the edge or node).
        p: drop probability in ``[0, 1)``.
    """

    p: float

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, role: Role, column: int, p: float = 0.1) -> DropoutLinear:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        layer = super().from_linear(linear, role=role, column=column)
        layer.p = float(p)
        return layer

    @property
    def noise_columns(self) -> int:
        return self.in_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Args: h: ``(rows, in_features)``; rows are ``S`` sample-major blocks while sampling."""
        if self.noise is None or self.p == 0.0:
            return F.linear(h, self.weight, self.bias)
        eps = self.noise.draw(h.shape[0], self.in_features, dtype=h.dtype, device=h.device, role=self.role)
        keep = eps < NormalDist().inv_cdf(1.0 - self.p)
        return F.linear(h * keep / (1.0 - self.p), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def dropoutize(model: nn.Module, *, edge_pattern: str, node_pattern: str, p: float) -> tuple[list[str], list[str]]:
    """Replace matching ``nn.Linear`` modules of ``model`` (in place) by :class:`DropoutLinear`.

    Patterns and return value as for :func:`~blip_ase.bayes.wrap.bayesianize`.

    Raises:
        ValueError: no linear matches, a name matches both patterns, or ``p`` is not in [0, 1).
    """
    return bayesianize(
        model,
        edge_pattern=edge_pattern,
        node_pattern=node_pattern,
        make=lambda linear, role, column: DropoutLinear.from_linear(linear, role=role, column=column, p=p),
    )


def no_coefficients(n_edges: int, n_nodes: int, *, like: torch.Tensor) -> Coefficients:
    """Coefficients with zero columns: "sample, with no learned rates" (dtype/device of ``like``)."""
    return Coefficients(like.new_zeros(n_edges, 0), like.new_zeros(n_nodes, 0))
