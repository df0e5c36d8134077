"""Bayesian linear layer with the local reparameterisation trick (paper, Algorithm 1).

The layer keeps the mean weights ``theta`` as the ordinary ``weight`` and ``bias``
parameters of :class:`torch.nn.Linear`, so state_dict keys and pretrained weights are
unchanged. The weight posterior is ``N(theta, alpha * theta^2)`` with one coefficient per
input row (per edge for message layers, per node for update layers); the output is sampled
directly:

    m = h @ theta.T + b,   v = alpha * (h*h) @ (theta*theta).T,   z = m + sqrt(v) * eps.

Whether the layer samples is decided by a transient context set by
:func:`blip_ase.bayes.wrap.noise_context`; outside such a context (or with no noise source)
the layer is exactly ``nn.Linear`` (MAP mode, same cost).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Role = Literal["edge", "node"]


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

    def prepare(self, per_sample: int, *, dtype: torch.dtype) -> None:
        """Draw the ``per_sample`` numbers each sample's coming draws will take, in one call per sample."""
        self._tape, self._offset = self._fill(per_sample, dtype), 0

    def draw(self, rows: int, cols: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Noise of shape ``(rows, cols)``; rows are ``n_samples`` equal blocks, one per sample."""
        if rows % self.n_samples:
            raise ValueError(f"{rows} rows cannot be split into {self.n_samples} samples")
        size = rows // self.n_samples * cols
        tape = self._tape
        if tape is None or tape.dtype != dtype or self._offset + size > tape.shape[1]:
            tape, self._offset = self._fill(size, dtype), 0
        block = tape[:, self._offset : self._offset + size]
        self._offset += size
        return block.reshape(rows, cols).to(device)


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
        mean = F.linear(h, self.weight, self.bias)
        if self.noise is None or self.coefficient is None:
            return mean
        if self.coefficient.shape[0] != h.shape[0]:
            raise RuntimeError(
                f"Bayesian {self.role} layer got {h.shape[0]} input rows but {self.coefficient.shape[0]} "
                f"{self.role} coefficients: the layer must be applied once per {self.role}"
            )
        # std = sqrt(alpha) * sqrt((h*h) @ (theta*theta).T). sqrt has an infinite derivative at 0,
        # so the per-row sqrt(alpha) is taken only where alpha > 0 (alpha = 0 gives exactly MAP)
        # and the per-activation variance is floored far below any float32 resolution.
        c = self.coefficient
        sqrt_c = torch.where(c > 0, c.clamp_min(1e-30).sqrt(), torch.zeros_like(c))
        std = sqrt_c * F.linear(h * h, self.weight * self.weight).clamp_min(1e-30).sqrt()
        eps = self.noise.draw(h.shape[0], self.out_features, dtype=h.dtype, device=h.device)
        return torch.addcmul(mean, std, eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, role={self.role}, column={self.column}"
