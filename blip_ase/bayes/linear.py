"""Bayesian linear layer with the local reparameterisation trick (paper, Algorithm 1).

The layer keeps the mean weights ``theta`` as the ordinary ``weight`` and ``bias``
parameters of :class:`torch.nn.Linear`, so state_dict keys and pretrained weights are
unchanged. The weight posterior is ``N(theta, alpha * theta^2)`` with one coefficient per
input row (per edge for message layers, per node for update layers); the output is sampled
directly:

    m = h @ theta.T + b,   v = alpha * (h*h) @ (theta*theta).T,   z = m + sqrt(v) * eps.

Whether the layer samples is decided by a transient context set by
:func:`blip_ase.bayes.wrap.noise_context`; outside such a context (or with no noise source)
the layer is exactly ``nn.Linear`` (MAP mode, same cost). Within :func:`input_gradients_only`
(prediction: forces and stress, no training) a sampling layer differentiates itself by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

PREPARE_LIMIT = 1 << 18  # standard normals per sample (1 MiB in float32) drawn ahead by prepare()

Role = Literal["edge", "node"]

_FLOOR = 1e-30  # added to every per-activation variance: sqrt has an infinite derivative at 0
_INPUT_GRADIENTS_ONLY: ContextVar[bool] = ContextVar("blip_input_gradients_only", default=False)


@contextmanager
def input_gradients_only() -> Iterator[None]:
    """Within the block, sampling Bayesian layers give derivatives with respect to their input
    and alpha only (forces, stress): no parameter gradients, no derivatives of derivatives.

    Their backward is then written by hand and keeps two ``(rows, out)`` tensors where autograd
    keeps a chain of them, which saves memory traffic. The calculator predicts in this mode;
    training must not (a second derivative raises).
    """
    token = _INPUT_GRADIENTS_ONLY.set(True)
    try:
        yield
    finally:
        _INPUT_GRADIENTS_ONLY.reset(token)


class _SampledLinear(torch.autograd.Function):
    """``h W^T + b + sqrt_c * std * eps`` with ``std = sqrt((h*h) (W*W)^T + floor)``,
    differentiated with respect to ``h`` and ``sqrt_c`` only (``weight`` and ``bias`` come detached)."""

    @staticmethod
    def forward(ctx, h, weight, bias, sqrt_c, eps):  # noqa: D102
        weight_sq = weight * weight
        out = F.linear(h, weight, bias)
        std = F.linear(h * h, weight_sq, weight.new_full((weight.shape[0],), _FLOOR)).sqrt_()
        out.addcmul_(std, eps * sqrt_c)
        ctx.save_for_backward(h, weight, weight_sq, sqrt_c, eps, std)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        h, weight, weight_sq, sqrt_c, eps, std = ctx.saved_tensors
        grad_eps = grad * eps  # d out / d std, per unit sqrt_c
        grad_c = torch.linalg.vecdot(grad_eps, std).unsqueeze(1) if ctx.needs_input_grad[3] else None
        grad_var = grad_eps.div_(std).mul_(0.5 * sqrt_c)  # d out / d((h*h) (W*W)^T)
        grad_h = (grad_var @ weight_sq).mul_(h).mul_(2.0).addmm_(grad, weight)
        return grad_h, None, None, grad_c, None


class NoiseSource:
    """Standard-normal noise for ``S`` Monte Carlo samples, one generator per sample.

    Sample ``s`` of a batched pass draws its noise from ``generators[s]`` only, so S samples
    in one batched forward equal S sequential forwards that use the same generators.

    A pass may :meth:`prepare` the noise it will use: each generator then fills its sample's
    whole share in one call (one call per layer and sample costs more than the numbers on CPU),
    and :meth:`draw` hands out consecutive pieces of it. A draw that does not fit is filled on
    its own. Either way a sample's numbers depend only on its generator and on the sequence of
    per-sample sizes, which is the same batched or sequential.

    Args:
        generators: one :class:`torch.Generator` per Monte Carlo sample.
    """

    def __init__(self, generators: list[torch.Generator]):
        if not generators:
            raise ValueError("NoiseSource needs at least one generator")
        self.generators = list(generators)
        self._tape: torch.Tensor | None = None  # (S, numbers prepared per sample)
        self._offset = 0

    @classmethod
    def from_seeds(cls, seeds: list[int], device: torch.device | str = "cpu") -> NoiseSource:
        """Build a source with one generator per seed (on ``device``)."""
        return cls([torch.Generator(device=device).manual_seed(int(s)) for s in seeds])

    @classmethod
    def spawn(cls, generator: torch.Generator, n_samples: int, device: torch.device | str = "cpu") -> NoiseSource:
        """Draw ``n_samples`` seeds from ``generator`` and build a source from them."""
        seeds = torch.randint(0, 2**62, (n_samples,), generator=generator).tolist()
        return cls.from_seeds(seeds, device)

    @property
    def n_samples(self) -> int:
        return len(self.generators)

    def split(self, start: int, stop: int) -> NoiseSource:
        """Source for samples ``start:stop`` (used to chunk a batched pass)."""
        return NoiseSource(self.generators[start:stop])

    def _fill(self, per_sample: int, dtype: torch.dtype) -> torch.Tensor:
        tape = torch.empty(self.n_samples, per_sample, dtype=dtype, device=self.generators[0].device)
        for row, g in zip(tape, self.generators):
            row.normal_(generator=g)
        return tape

    def prepare(self, layout: list[tuple[Role, int, int]], *, dtype: torch.dtype) -> None:
        """Draw the numbers each sample's coming draws will take, in one call per sample, when they
        are at most :data:`PREPARE_LIMIT` per sample (a large structure draws per layer, which
        bounds memory; the choice depends on the per-sample size only, so batched and sequential
        samples agree).

        Args:
            layout: the coming draws in order, ``(role, rows per sample, columns)`` each.
        """
        per_sample = sum(rows * cols for _, rows, cols in layout)
        self._tape, self._offset = (self._fill(per_sample, dtype) if 0 < per_sample <= PREPARE_LIMIT else None), 0

    def draw(
        self, rows: int, cols: int, *, dtype: torch.dtype, device: torch.device, role: Role | None = None
    ) -> torch.Tensor:
        """Noise of shape ``(rows, cols)``; rows are ``n_samples`` equal blocks, one per sample.
        ``role`` (``"edge"`` or ``"node"``: what the rows are) is for sources that split a
        sample's rows by structure (:class:`StructureNoise`); this one does not need it."""
        if rows % self.n_samples:
            raise ValueError(f"{rows} rows cannot be split into {self.n_samples} samples")
        size = rows // self.n_samples * cols
        tape = self._tape
        if tape is None or tape.dtype != dtype or self._offset + size > tape.shape[1]:
            tape, self._offset = self._fill(size, dtype), 0
        block = tape[:, self._offset : self._offset + size]
        self._offset += size
        return block.reshape(rows, cols).to(device)


def structure_sizes(model, graph, n_graphs: int) -> tuple[list[int], list[int]]:
    """Edges and atoms of each of the ``n_graphs`` structures of ``graph`` (a batch of a
    :class:`~blip_ase.models.potential.Potential`), from its inference network inputs; zeros for a
    model that has none (a deep ensemble draws no noise)."""
    try:
        x = model.posterior_inputs(graph)
    except NotImplementedError:
        return [0] * n_graphs, [0] * n_graphs
    nodes = torch.bincount(x.atom_graph, minlength=x.n_graphs)
    edges = torch.bincount(x.atom_graph[x.edge_index[0]], minlength=x.n_graphs)
    return edges.tolist(), nodes.tolist()


class StructureNoise(NoiseSource):
    """Noise for ``S`` samples of a batch of ``G`` structures, one generator per sample and structure.

    Structure ``g`` of sample ``s`` draws its rows from ``generators[s][g]`` only, so a
    structure's samples do not depend on which other structures share the batch: a batched
    pass equals ``G`` separate passes that each use a :class:`StructureNoise` of one structure
    (batched many-walker MD, :mod:`blip_ase.md.walkers`). :meth:`prepare` fills each structure's
    share of a pass in one generator call per sample and structure.

    Args:
        generators: ``[S][G]`` generators.
        edges, nodes: ``(G,)`` edges and atoms of each structure, in batch order (the rows of an
            edge or node layer are the structures' edges or atoms, concatenated).
    """

    def __init__(self, generators: list[list[torch.Generator]], edges: list[int], nodes: list[int]):
        super().__init__([row[0] for row in generators])
        if any(len(row) != len(edges) for row in generators) or len(edges) != len(nodes):
            raise ValueError(
                f"StructureNoise needs one generator per sample and structure and the edge and atom counts of "
                f"every structure: got {[len(row) for row in generators]} generators, {len(edges)} edge and "
                f"{len(nodes)} atom counts"
            )
        self.structure_generators = [list(row) for row in generators]
        self.counts = {"edge": [int(n) for n in edges], "node": [int(n) for n in nodes]}
        self._tapes: list[torch.Tensor | None] = []
        self._offsets: list[int] = []

    @classmethod
    def spawn_per_structure(
        cls, generators: list[torch.Generator], n_samples: int, edges: list[int], nodes: list[int],
        device: torch.device | str = "cpu",
    ) -> StructureNoise:  # fmt: skip
        """Draw ``n_samples`` seeds from each structure's own ``generators[g]`` (as
        :meth:`NoiseSource.spawn` does from one) and build the source from them."""
        seeds = [torch.randint(0, 2**62, (n_samples,), generator=g).tolist() for g in generators]
        grid = [[torch.Generator(device=device).manual_seed(int(seeds[g][s])) for g in range(len(generators))]
                for s in range(n_samples)]  # fmt: skip
        return cls(grid, edges, nodes)

    def split(self, start: int, stop: int) -> StructureNoise:
        return StructureNoise(self.structure_generators[start:stop], self.counts["edge"], self.counts["node"])

    def prepare(self, layout: list[tuple[Role, int, int]], *, dtype: torch.dtype) -> None:
        """As :meth:`NoiseSource.prepare`, per structure: structure ``g`` of every sample fills its
        share of the coming draws in one call when that share is at most :data:`PREPARE_LIMIT`
        (decided from the structure alone, so a batched pass and a pass of the structure alone agree)."""
        self._tapes, self._offsets = [], []
        for g in range(len(self.counts["edge"])):
            size = sum(self.counts[role][g] * cols for role, _, cols in layout)
            tape = None
            if 0 < size <= PREPARE_LIMIT:
                tape = torch.empty(self.n_samples, size, dtype=dtype, device=self.generators[0].device)
                for row, sample in zip(tape, self.structure_generators):
                    row.normal_(generator=sample[g])
            self._tapes.append(tape)
            self._offsets.append(0)

    def draw(
        self, rows: int, cols: int, *, dtype: torch.dtype, device: torch.device, role: Role | None = None
    ) -> torch.Tensor:
        """As :meth:`NoiseSource.draw`; ``role`` says whether the rows are edges or atoms.

        Raises:
            ValueError: no ``role``, or a row count that is not ``n_samples`` times the
                structures' edges (or atoms) in total.
        """
        counts = self.counts.get(role or "")
        if counts is None or rows != self.n_samples * sum(counts):
            raise ValueError(
                f"StructureNoise cannot split {rows} {role} rows into {self.n_samples} samples of structures with "
                f"{self.counts[role] if role in self.counts else '?'} rows each (role must be 'edge' or 'node')"
            )
        tapes = self._tapes or [None] * len(counts)
        blocks = []  # (S, n_g * cols) per structure: sample s's rows of structure g
        for g, n in enumerate(counts):
            size, tape = n * cols, tapes[g]
            if tape is not None and tape.dtype == dtype and self._offsets[g] + size <= tape.shape[1]:
                blocks.append(tape[:, self._offsets[g] : self._offsets[g] + size])
                self._offsets[g] += size
            else:
                block = torch.empty(self.n_samples, size, dtype=dtype, device=self.generators[0].device)
                for row, sample in zip(block, self.structure_generators):
                    row.normal_(generator=sample[g])
                blocks.append(block)
        return torch.cat(blocks, dim=1).reshape(rows, cols).to(device)


class BayesianLinear(nn.Linear):
    """``nn.Linear`` whose weights are Gaussian with input-dependent variance ``alpha*theta^2``.

    Args:
        in_features, out_features, bias: as for :class:`torch.nn.Linear`.
        role: ``"edge"`` (message function, alpha per edge) or ``"node"`` (update function,
            beta per node).
        column: which column of the inference network's edge or node output this layer uses.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        role: Role,
        column: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.role = role
        self.column = column
        self.coefficient: torch.Tensor | None = None  # (rows, 1), set per forward by noise_context
        self.noise: NoiseSource | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, role: Role, column: int) -> BayesianLinear:
        """Bayesian copy of ``linear`` sharing its parameters (so optimiser state stays valid)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.role, layer.column = role, column
        layer.coefficient, layer.noise = None, None
        return layer

    @property
    def noise_columns(self) -> int:
        """Standard normals this layer draws per input row while sampling."""
        return self.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Args: h: ``(rows, in_features)``. Returns ``(rows, out_features)``."""
        if self.noise is None or self.coefficient is None:
            return F.linear(h, self.weight, self.bias)
        if self.coefficient.shape[0] != h.shape[0]:
            raise RuntimeError(
                f"Bayesian {self.role} layer got {h.shape[0]} input rows but {self.coefficient.shape[0]} "
                f"{self.role} coefficients: the layer must be applied once per {self.role}"
            )
        # std = sqrt(alpha) * sqrt((h*h) @ (theta*theta).T). sqrt has an infinite derivative at 0,
        # so the per-row sqrt(alpha) is taken only where alpha > 0 (alpha = 0 gives exactly MAP)
        # and _FLOOR, far below any float32 resolution, is added to the per-activation variance
        # (as the matmul's bias: cheaper than a clamp, whose backward needs a mask).
        c = self.coefficient
        sqrt_c = torch.where(c > 0, c.clamp_min(1e-30).sqrt(), torch.zeros_like(c))
        eps = self.noise.draw(h.shape[0], self.out_features, dtype=h.dtype, device=h.device, role=self.role)
        if _INPUT_GRADIENTS_ONLY.get():
            bias = None if self.bias is None else self.bias.detach()
            return _SampledLinear.apply(h, self.weight.detach(), bias, sqrt_c, eps)
        floor = self.weight.new_full((self.out_features,), _FLOOR)
        std = sqrt_c * F.linear(h * h, self.weight * self.weight, floor).sqrt()
        return torch.addcmul(F.linear(h, self.weight, self.bias), std, eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, role={self.role}, column={self.column}"
