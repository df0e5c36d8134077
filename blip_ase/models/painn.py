"""PaiNN (Schuett, Unke, Gastegger 2021) as per-atom energy network.

The message function's MLP runs per edge (on the sender's scalars gathered to the edge), so a
Bayesian message layer can give every edge its own noise (alpha per edge); the update MLP runs
per node (beta per node). Both act on scalar channels only: the vector mixings ``U`` and ``V``
stay deterministic, so for a fixed noise draw a sample is exactly rotation equivariant.

Module names of the Bayesian layers (see :data:`EDGE_PATTERN`, :data:`NODE_PATTERN`):
``interactions.<l>.context_net.<k>`` (message) and ``updates.<l>.update_net.<k>`` (update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

EDGE_PATTERN = r"interactions\.\d+\.context_net\.\d+"
NODE_PATTERN = r"updates\.\d+\.update_net\.\d+"


@dataclass(frozen=True)
class PaiNNConfig:
    """Architecture of :class:`PaiNN`.

    Attributes:
        n_features: width F of scalar and vector features.
        n_interactions: number of message/update blocks.
        n_rbf: number of sine radial basis functions.
        cutoff: radial cutoff in Angstrom (cosine cutoff function).
    """

    n_features: int = 64
    n_interactions: int = 3
    n_rbf: int = 20
    cutoff: float = 5.0


def sine_rbf(distance: torch.Tensor, n_rbf: int, cutoff: float) -> torch.Tensor:
    """``sin(n pi d / rc) / d`` for n = 1..n_rbf; distance ``(E,)`` -> ``(E, n_rbf)``."""
    n = torch.arange(1, n_rbf + 1, dtype=distance.dtype, device=distance.device)
    return torch.sin(n * math.pi * distance[:, None] / cutoff) / distance[:, None]


def cosine_cutoff(distance: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Smooth cutoff ``0.5 (cos(pi d / rc) + 1)`` for d < rc, else 0; ``(E,)``."""
    return 0.5 * (torch.cos(math.pi * distance / cutoff) + 1.0) * (distance < cutoff)


class _SharedEdgeValues(torch.autograd.Function):
    """``value`` ``(E, C)`` of one configuration, repeated for ``n`` stacked copies of it, as a function
    of the copies' distances ``(n E,)``: the derivative of copy k's row is ``derivative`` ``(E, C)``
    (computed once), so each copy's forces stay the exact derivatives of its own energy."""

    @staticmethod
    def forward(ctx, distance, value, derivative, n):  # noqa: D102
        ctx.save_for_backward(derivative)
        ctx.n = n
        return value.repeat(n, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        (derivative,) = ctx.saved_tensors
        grad_distance = torch.linalg.vecdot(grad.view(ctx.n, *derivative.shape), derivative).reshape(-1)
        return grad_distance, None, None, None


class Interaction(nn.Module):
    """Message block: scalar and vector messages from neighbours."""

    def __init__(self, n_features: int):
        super().__init__()
        f = n_features
        self.context_net = nn.Sequential(nn.Linear(f, f), nn.SiLU(), nn.Linear(f, 3 * f))

    def forward(self, s, v, filters, unit, edge_index):
        i, j = edge_index
        f = s.shape[-1]
        # index_select / index_add: several times faster than advanced indexing and scatter on CPU
        x = self.context_net(s.index_select(0, j)) * filters  # (E, 3F), per edge
        ds, dv_r, dv_v = torch.split(x, f, dim=-1)
        dv = dv_r[:, None, :] * unit[:, :, None] + dv_v[:, None, :] * v.index_select(0, j)  # (E, 3, F)
        return s.index_add(0, i, ds), v.index_add(0, i, dv)


class Update(nn.Module):
    """Update block: gated mixing of each atom's scalar and vector features."""

    def __init__(self, n_features: int):
        super().__init__()
        f = n_features
        self.mix_u = nn.Linear(f, f, bias=False)
        self.mix_v = nn.Linear(f, f, bias=False)
        self.update_net = nn.Sequential(nn.Linear(2 * f, f), nn.SiLU(), nn.Linear(f, 3 * f))

    def forward(self, s, v):
        f = s.shape[-1]
        u, w = self.mix_u(v), self.mix_v(v)  # (N, 3, F); deterministic on vector channels
        w_norm = torch.sqrt((w * w).sum(dim=1) + 1e-8)
        a = self.update_net(torch.cat([s, w_norm], dim=-1))
        a_vv, a_sv, a_ss = torch.split(a, f, dim=-1)
        return s + a_ss + a_sv * (u * w).sum(dim=1), v + a_vv[:, None, :] * u


class PaiNN(nn.Module):
    """Per-atom energies from species and edge vectors.

    Args:
        n_elements: number of element indices.
        config: :class:`PaiNNConfig`.
    """

    def __init__(self, n_elements: int, config: PaiNNConfig):
        super().__init__()
        f, self.config = config.n_features, config
        self.embedding = nn.Embedding(n_elements, f)
        self.filter_net = nn.Linear(config.n_rbf, config.n_interactions * 3 * f)
        self.interactions = nn.ModuleList(Interaction(f) for _ in range(config.n_interactions))
        self.updates = nn.ModuleList(Update(f) for _ in range(config.n_interactions))
        self.readout = nn.Sequential(nn.Linear(f, f // 2), nn.SiLU(), nn.Linear(f // 2, 1))

    def forward(
        self, species: torch.Tensor, edge_index: torch.Tensor, edge_vector: torch.Tensor, *, copies: int = 1
    ) -> torch.Tensor:
        """Args:
            species: ``(N,)`` element indices; edge_index: ``(2, E)``; edge_vector: ``(E, 3)`` A.
            copies: the graph is this many identical copies of one configuration, stacked (the
                Monte Carlo samples of a prediction): the radial filters are computed once and
                shared (:meth:`filters`). Only for first derivatives (forces, stress).

        Returns:
            ``(N,)`` per-atom energies in normalised units.
        """
        return self.readout(self.scalar_features(species, edge_index, edge_vector, copies=copies)).squeeze(-1)

    def radial_filters(self, distance: torch.Tensor) -> torch.Tensor:
        """``(E, n_interactions * 3F)`` filters of every interaction from distances ``(E,)``."""
        cfg = self.config
        return self.filter_net(sine_rbf(distance, cfg.n_rbf, cfg.cutoff)) * cosine_cutoff(distance, cfg.cutoff)[:, None]

    def filters(self, distance: torch.Tensor, copies: int) -> torch.Tensor:
        """:meth:`radial_filters`; with ``copies > 1`` computed with their derivative on the first
        copy's distances only and repeated (the basis and the filter network are the same for
        every Monte Carlo sample)."""
        if copies == 1:
            return self.radial_filters(distance)
        cfg = self.config
        d = distance[: distance.shape[0] // copies].detach()[:, None]
        with torch.no_grad():
            k = torch.arange(1, cfg.n_rbf + 1, dtype=d.dtype, device=d.device) * (math.pi / cfg.cutoff)
            sin, cos = torch.sin(k * d), torch.cos(k * d)
            rbf, rbf_prime = sin / d, (k * d * cos - sin) / (d * d)  # sine_rbf and its derivative
            inside = (d < cfg.cutoff).to(d.dtype)
            cut = 0.5 * (torch.cos(math.pi * d / cfg.cutoff) + 1.0) * inside  # cosine_cutoff
            cut_prime = -0.5 * math.pi / cfg.cutoff * torch.sin(math.pi * d / cfg.cutoff) * inside
            linear = self.filter_net(rbf)
            value = linear * cut
            derivative = torch.addcmul(rbf_prime @ self.filter_net.weight.T * cut, linear, cut_prime)
        return _SharedEdgeValues.apply(distance, value, derivative, copies)

    def scalar_features(
        self, species: torch.Tensor, edge_index: torch.Tensor, edge_vector: torch.Tensor, *, copies: int = 1
    ) -> torch.Tensor:
        """``(N, F)`` invariant scalar features after the last update (the readout's input);
        arguments as :meth:`forward`."""
        cfg = self.config
        distance = edge_vector.norm(dim=-1)
        unit = edge_vector / distance[:, None]
        filters = torch.split(self.filters(distance, copies), 3 * cfg.n_features, dim=-1)
        s = self.embedding(species)
        v = s.new_zeros(s.shape[0], 3, s.shape[1])
        for interaction, update, w in zip(self.interactions, self.updates, filters):
            s, v = interaction(s, v, w, unit, edge_index)
            s, v = update(s, v)
        return s
