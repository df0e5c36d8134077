"""Inference network E_psi: invariant per-edge alpha and per-node beta (paper, section 3.2).

It sees only invariant inputs (interatomic distances, element indices; optionally the unit
edge vector for models that are not equivariant by design, such as ORB v3), predicts a dropout
probability ``p = sigmoid(logit)`` clamped to ``[p_min, p_max]`` and returns
``alpha = p / (1 - p)``. It runs once per configuration; its output is reused by every Monte
Carlo sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass
class PosteriorInputs:
    """What the inference network sees of a (batched) configuration.

    Attributes:
        species: ``(N,)`` element indices. edge_index: ``(2, E)`` (receiver i, sender j).
        edge_vector: ``(E, 3)`` edge vectors in Angstrom (the backend's sign convention).
        atom_graph: ``(N,)`` index of each atom's structure. n_graphs: number of structures.
    """

    species: torch.Tensor
    edge_index: torch.Tensor
    edge_vector: torch.Tensor
    atom_graph: torch.Tensor
    n_graphs: int


@dataclass
class Coefficients:
    """Variational adaptive dropout coefficients of one (batched) configuration.

    Attributes:
        edge: ``(n_edges, n_edge_layers)`` alpha, one column per message-function layer.
        node: ``(n_nodes, n_node_layers)`` beta, one column per update-function layer.
        edge_vector: ``(n_edges, 3)`` the edge vectors alpha was computed from (A), or None.
        edge_jacobian: ``(n_edges, n_edge_layers, 3)`` d alpha / d edge_vector of the edge's own
            vector, or None. With both set, :meth:`edge_at` gives alpha at displaced vectors to
            first order, exactly at the computed configuration, so forces and stress of a sample
            are the full derivatives of its energy although the inference network ran once.
        node_jacobian: ``(n_edges, n_node_layers, 3)`` d beta[receiver[e]] / d edge_vector[e]
            when beta depends on the atom's neighbourhood (a sum over its edges), else None.
        edge_index: ``(2, n_edges)`` (receiver, sender) of each edge, with ``node_jacobian`` or
            the environment terms.
        environment_jacobian: ``(n_edges, D, 3)`` d env[receiver[e]] / d edge_vector[e] of the
            atoms' invariant environment features (a sum over their edges), when alpha sees them.
        alpha_environment: ``(n_edges, n_edge_layers, 2, D)`` d alpha[e] / d env of the edge's
            receiver (``[:, :, 0]``) and sender (``[:, :, 1]``); alpha of an edge then depends on
            every edge vector of both its atoms, through the chain rule of :meth:`edge_at`.
    """

    edge: torch.Tensor
    node: torch.Tensor
    edge_vector: torch.Tensor | None = None
    edge_jacobian: torch.Tensor | None = None
    node_jacobian: torch.Tensor | None = None
    edge_index: torch.Tensor | None = None
    environment_jacobian: torch.Tensor | None = None
    alpha_environment: torch.Tensor | None = None

    def repeat(self, n_samples: int) -> Coefficients:
        """Coefficients of ``n_samples`` stacked copies of the configuration (sample-major)."""

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat(n_samples, *([1] * (t.dim() - 1)))

        edge_index = None
        if self.edge_index is not None:
            offsets = torch.arange(n_samples, device=self.edge_index.device) * self.node.shape[0]
            edge_index = (self.edge_index[:, None, :] + offsets[None, :, None]).reshape(2, -1)
        return Coefficients(
            rep(self.edge), rep(self.node), rep(self.edge_vector), rep(self.edge_jacobian), rep(self.node_jacobian),
            edge_index, rep(self.environment_jacobian), rep(self.alpha_environment),
        )  # fmt: skip

    def edge_at(self, edge_vector: torch.Tensor) -> Coefficients:
        """Coefficients whose alpha carries the derivative with respect to ``edge_vector``.

        ``edge_vector (n_edges, 3)`` must equal :attr:`edge_vector` in value (the same
        configuration, possibly as a function of strained or replicated positions); the values
        of alpha and beta are unchanged, their gradients are those of the inference network.
        """
        if self.edge_jacobian is None or self.edge_vector is None:
            return self
        step = edge_vector - self.edge_vector
        edge, node = self.edge, self.node
        if edge.numel():
            edge = edge + torch.einsum("elk,ek->el", self.edge_jacobian, step)
        if self.alpha_environment is not None and self.environment_jacobian is not None and edge.numel():
            i, j = self.edge_index
            moved = torch.einsum("edk,ek->ed", self.environment_jacobian, step)
            env_step = moved.new_zeros(self.node.shape[0], moved.shape[1]).index_add(0, i, moved)
            edge = edge + torch.einsum("eld,ed->el", self.alpha_environment[:, :, 0], env_step.index_select(0, i))
            edge = edge + torch.einsum("eld,ed->el", self.alpha_environment[:, :, 1], env_step.index_select(0, j))
        if self.node_jacobian is not None and self.edge_index is not None and node.numel():
            node = node.index_add(0, self.edge_index[0], torch.einsum("elk,ek->el", self.node_jacobian, step))
        return replace(self, edge=edge, node=node, edge_vector=edge_vector)


def edge_jacobian(
    alpha: torch.Tensor, edge_vector: torch.Tensor, *, create_graph: bool, retain_graph: bool = False
) -> torch.Tensor:
    """``(E, L, 3)`` d alpha[e, l] / d edge_vector[e] for alpha ``(E, L)`` computed edge-wise
    from ``edge_vector (E, 3)`` (a tensor that requires grad); one batched backward.

    The same holds for any ``(rows, L)`` output in which each edge vector affects one row per
    column (beta of the edge's receiver, for a neighbourhood-aware node head): column ``l`` of
    the result is then the derivative of that row."""
    n_rows, n_cols = alpha.shape
    n_edges = edge_vector.shape[0]
    if n_cols == 0 or n_edges == 0 or n_rows == 0:
        return edge_vector.new_zeros(n_edges, n_cols, *edge_vector.shape[1:])
    seeds = torch.eye(n_cols, dtype=alpha.dtype, device=alpha.device)[:, None, :].expand(n_cols, n_rows, n_cols)
    (jacobian,) = torch.autograd.grad(
        alpha, edge_vector, grad_outputs=seeds, create_graph=create_graph, retain_graph=retain_graph or create_graph,
        is_grads_batched=True, allow_unused=True,
    )  # fmt: skip
    if jacobian is None:
        return edge_vector.new_zeros(n_edges, n_cols, *edge_vector.shape[1:])
    return jacobian.permute(1, 0, 2)


def gaussian_rbf(distance: torch.Tensor, n_rbf: int, cutoff: float) -> torch.Tensor:
    """Gaussian radial basis of ``distance`` ``(E,)`` on ``[0, cutoff]``; returns ``(E, n_rbf)``."""
    centers = torch.linspace(0.0, cutoff, n_rbf, dtype=distance.dtype, device=distance.device)
    width = cutoff / max(n_rbf - 1, 1)
    return torch.exp(-0.5 * ((distance[:, None] - centers) / width) ** 2)


def _mlp(n_in: int, hidden: int, n_hidden: int, n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n_hidden):
        layers += [nn.Linear(n_in, hidden), nn.SiLU()]
        n_in = hidden
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class InferenceNetwork(nn.Module):
    """Two-headed invariant MLP producing alpha per edge and beta per node.

    Args:
        n_elements: number of element indices (``species`` takes values in ``[0, n_elements)``).
        n_edge_layers, n_node_layers: number of Bayesian message / update layers (output columns).
        cutoff: radial cutoff in Angstrom for the distance basis.
        hidden: width of the hidden layers; n_hidden: number of hidden layers (swish).
        n_rbf: number of Gaussian radial basis functions of the distance.
        unit_vector: also feed the unit edge vector (not rotation invariant; for ORB v3).
        p_min, p_max: clamp of the dropout probability.
        p_init: dropout probability the network starts from.
        neighbourhood: the node head also sees the atom's neighbourhood, ``log(1 + sum_j
            rbf(r_ij) fc(r_ij))`` over its edges (invariant), so beta can tell a crowded or
            stretched environment from a normal one; otherwise beta depends on the element only.
        environment: with ``K > 0`` the edge head also sees both atoms' environments,
            :meth:`environment_features` with ``K`` radial channels (two- and three-body
            invariants), so alpha can flag an unusual environment around a normal bond; 0 = alpha
            from the edge's length and elements only.
    """

    def __init__(
        self,
        n_elements: int,
        n_edge_layers: int,
        n_node_layers: int,
        *,
        cutoff: float,
        hidden: int = 64,
        n_hidden: int = 2,
        n_rbf: int = 20,
        embedding_dim: int = 16,
        unit_vector: bool = False,
        p_min: float = 0.0,
        p_max: float = 0.8,
        p_init: float = 0.01,
        neighbourhood: bool = False,
        environment: int = 0,
    ):
        super().__init__()
        if not 0.0 <= p_min <= p_init <= p_max < 1.0:
            raise ValueError(f"need 0 <= p_min <= p_init <= p_max < 1, got {p_min}, {p_init}, {p_max}")
        if environment < 0:
            raise ValueError(f"environment (radial channels of the environment) must be >= 0, got {environment}")
        self.cutoff, self.n_rbf, self.unit_vector = cutoff, n_rbf, unit_vector
        self.p_min, self.p_max, self.neighbourhood, self.environment = p_min, p_max, neighbourhood, environment
        self.embedding = nn.Embedding(n_elements, embedding_dim)
        n_edge_in = n_rbf + 2 * embedding_dim + (3 if unit_vector else 0) + 4 * environment
        self.edge_head = _mlp(n_edge_in, hidden, n_hidden, max(n_edge_layers, 1))
        self.node_head = _mlp(embedding_dim + (n_rbf if neighbourhood else 0), hidden, n_hidden, max(n_node_layers, 1))
        self.n_edge_layers, self.n_node_layers = n_edge_layers, n_node_layers
        logit = math.log(p_init / (1.0 - p_init)) if p_init > 0 else -20.0
        for head in (self.edge_head, self.node_head):
            nn.init.zeros_(head[-1].weight)
            nn.init.constant_(head[-1].bias, logit)

    def _alpha(self, logit: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logit).clamp(self.p_min, self.p_max)
        return p / (1.0 - p)

    def with_jacobian(
        self, species: torch.Tensor, edge_index: torch.Tensor, edge_vector: torch.Tensor, *, create_graph: bool = False
    ) -> Coefficients:
        """:meth:`forward` plus ``edge_vector`` and the Jacobians, once per configuration.

        With ``create_graph`` (training) alpha, beta and the Jacobians stay differentiable with
        respect to the network's parameters; otherwise they are detached. With environment
        features, alpha's dependence on other edges is kept factored (d alpha / d env and
        d env / d vector), so its size grows with the edges, not with their square.
        """
        receiver, sender = edge_index
        with torch.enable_grad():
            vectors = edge_vector.detach().requires_grad_(True)
            pair = env = None
            if self.environment:
                env = self.environment_features(edge_index, vectors, len(species))
                pair = tuple(env.detach().index_select(0, k).requires_grad_(True) for k in (receiver, sender))
            c = self(species, edge_index, vectors, pair)

            def jacobian(out: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
                return edge_jacobian(out, wrt, create_graph=create_graph, retain_graph=True)

            edge_jac = jacobian(c.edge, vectors)
            node_jac = jacobian(c.node, vectors) if self.neighbourhood else None
            env_jac = alpha_env = None
            if pair is not None:
                alpha_env = torch.stack([jacobian(c.edge, pair[0]), jacobian(c.edge, pair[1])], dim=2)
                env_jac = jacobian(env, vectors)
        parts = [c.edge, c.node, edge_jac, node_jac, env_jac, alpha_env]
        if not create_graph:
            parts = [None if t is None else t.detach() for t in parts]
        edge, node, edge_jac, node_jac, env_jac, alpha_env = parts
        index = edge_index if node_jac is not None or env_jac is not None else None
        return Coefficients(edge, node, vectors.detach(), edge_jac, node_jac, index, env_jac, alpha_env)

    def environment_features(self, edge_index: torch.Tensor, edge_vector: torch.Tensor, n_nodes: int) -> torch.Tensor:
        """``(N, 2K)`` invariant environment of each atom from its edges (``K`` = ``environment``
        Gaussian channels ``g_k`` on ``[0, cutoff]`` times a cosine cutoff): ``log(1 + rho_k)``
        with ``rho_k = sum_j g_k(r_ij)`` (two-body: coordination, stretch) and ``log(1 + |m_k|^2)``
        with ``m_k = sum_j g_k(r_ij) r_ij / r_ij`` (three-body: ``|m_k|^2 = sum_jl g_k g_k cos
        theta_jil``, how one-sided the neighbourhood is). Smooth in the positions."""
        distance = edge_vector.norm(dim=-1)
        fc = 0.5 * (torch.cos(math.pi * distance / self.cutoff) + 1.0) * (distance < self.cutoff)
        weight = gaussian_rbf(distance, self.environment, self.cutoff) * fc[:, None]
        unit = edge_vector / distance.clamp_min(1e-9)[:, None]
        rho = weight.new_zeros(n_nodes, self.environment).index_add(0, edge_index[0], weight)
        moment = weight[:, :, None] * unit[:, None]
        moment = moment.new_zeros(n_nodes, self.environment, 3).index_add(0, edge_index[0], moment)
        return torch.cat([torch.log1p(rho), torch.log1p((moment**2).sum(-1))], dim=-1)

    def neighbourhood_features(self, edge_index: torch.Tensor, edge_vector: torch.Tensor, n_nodes: int) -> torch.Tensor:
        """``(N, n_rbf)`` ``log(1 + sum over the atom's edges of rbf(r) * fc(r))``, smooth in the
        positions (cosine cutoff ``fc``) and invariant."""
        distance = edge_vector.norm(dim=-1)
        fc = 0.5 * (torch.cos(math.pi * distance / self.cutoff) + 1.0) * (distance < self.cutoff)
        terms = gaussian_rbf(distance, self.n_rbf, self.cutoff) * fc[:, None]
        return torch.log1p(terms.new_zeros(n_nodes, self.n_rbf).index_add(0, edge_index[0], terms))

    def forward(
        self, species: torch.Tensor, edge_index: torch.Tensor, edge_vector: torch.Tensor,
        environment: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Coefficients:  # fmt: skip
        """Args:
            species: ``(N,)`` element indices.
            edge_index: ``(2, E)`` (receiver i, sender j).
            edge_vector: ``(E, 3)`` r_j - r_i in Angstrom.
            environment: the receiver's and sender's :meth:`environment_features` of each edge
                ``((E, 2K), (E, 2K))``, when computed by the caller (:meth:`with_jacobian`);
                by default computed here from ``edge_vector``.

        Returns:
            :class:`Coefficients` with ``edge (E, n_edge_layers)`` and ``node (N, n_node_layers)``.
        """
        if self.environment and environment is None:
            env = self.environment_features(edge_index, edge_vector, len(species))
            environment = (env.index_select(0, edge_index[0]), env.index_select(0, edge_index[1]))
        distance = edge_vector.norm(dim=-1)
        emb = self.embedding(species)
        parts = [gaussian_rbf(distance, self.n_rbf, self.cutoff), emb[edge_index[0]], emb[edge_index[1]]]
        if self.unit_vector:
            parts.append(edge_vector / distance.clamp_min(1e-9)[:, None])
        if environment is not None:
            parts.extend(environment)
        edge = self._alpha(self.edge_head(torch.cat(parts, dim=-1)))[:, : self.n_edge_layers]
        node_in = emb
        if self.neighbourhood:
            node_in = torch.cat([emb, self.neighbourhood_features(edge_index, edge_vector, len(species))], dim=-1)
        node = self._alpha(self.node_head(node_in))[:, : self.n_node_layers]
        return Coefficients(edge, node)
