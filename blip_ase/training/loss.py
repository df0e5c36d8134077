"""The ELBO loss: weighted energy, force and stress errors plus lambda * KL; optionally a scoring
rule for the force variances (:func:`variance_nll`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from blip_ase.bayes import Coefficients, kl_divergence
from blip_ase.data.dataset import Batch
from blip_ase.training.config import LossConfig


@dataclass(frozen=True)
class Share:
    """This process's part of the global batch, per normaliser of the loss: ``N * local / global``
    counts (:func:`blip_ase.training.distributed.shares`) of structures (energy and stress means),
    atoms (force means) and rows of alpha (edges) and beta (nodes) (KL means). DDP averages the N
    ranks' gradients, so with each local mean multiplied by its share the average is the gradient
    of the global batch's loss. All 1 in a single process.
    """

    structures: float = 1.0
    atoms: float = 1.0
    edges: float = 1.0
    nodes: float = 1.0


def error(pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Mean elementwise error of the configured kind (a scalar tensor)."""
    if cfg.kind == "l1":
        return F.l1_loss(pred, target)
    if cfg.kind == "l2":
        return F.mse_loss(pred, target)
    return F.huber_loss(pred, target, delta=cfg.huber_delta)


def _scaled(factor: float, term: torch.Tensor) -> torch.Tensor:
    """``factor * term``, without an operation for a factor of 1 (one process)."""
    return term if factor == 1.0 else factor * term


def elbo_loss(
    out: dict[str, torch.Tensor],
    batch: Batch,
    cfg: LossConfig,
    *,
    coefficients: Coefficients | None = None,
    p0: float = 0.5,
    kl_weight: float = 0.0,
    share: Share = Share(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative ELBO, with the data terms averaged over the ``S`` Monte Carlo samples of ``out``.

    Args:
        out: model output for ``S`` samples: energy ``(S, G)``, forces ``(S, N, 3)``,
            optionally stress ``(S, G, 3, 3)``.
        batch: reference labels.
        coefficients: alpha/beta of the batch (None for a deterministic model: no KL).
        share: this process's part of the global batch (distributed training).

    Returns:
        ``(loss, parts)`` with the float values of each term for logging.
    """
    def data_error(key: str, target: torch.Tensor) -> torch.Tensor:
        pred = out[key]
        return error(pred[0] if len(pred) == 1 else pred, target if len(pred) == 1 else target.expand_as(pred), cfg)

    terms = {
        "energy": _scaled(share.structures, data_error("energy", batch.energy)),
        "forces": _scaled(share.atoms, data_error("forces", batch.forces)),
    }
    loss = cfg.energy_weight * terms["energy"] + cfg.forces_weight * terms["forces"]
    if cfg.stress_weight and batch.stress is not None:
        terms["stress"] = _scaled(share.structures, data_error("stress", batch.stress))
        loss = loss + cfg.stress_weight * terms["stress"]
    if coefficients is not None and kl_weight:
        terms["kl"] = kl_divergence(coefficients, p0, weights=(share.edges, share.nodes))
        loss = loss + kl_weight * terms["kl"]
    return loss, {k: float(v.detach()) for k, v in terms.items()}


def variance_nll(
    forces: torch.Tensor,
    target: torch.Tensor,
    *,
    share: Share = Share(),
    reduce: Callable[[Sequence[float]], Sequence[float]] | None = None,
) -> tuple[torch.Tensor, float]:
    """Gaussian NLL of the reference forces under the spread of ``S >= 2`` Monte Carlo samples,
    with the variances multiplied by the NLL-optimal scale: a proper scoring rule for how the
    variances follow the errors, blind to their overall size (that is the KL terms' business and
    ``blip calibrate``'s).

    Per atom ``i``: ``m_i`` the sample mean (detached: the term trains the variances, not the
    prediction), ``v_i`` the unbiased sample variance's trace / 3, ``e_i = |m_i - F_i|^2 / 3``.
    With ``s = mean(e / v)`` over the (global) batch, held fixed, the term is
    ``0.5 mean(log v_i + e_i / (s v_i))``: its gradient is that of the scale-free NLL
    ``0.5 (mean(log v) + log mean(e / v))``, which is smallest when ``v`` is proportional to ``e``.

    Args:
        forces: ``(S, N, 3)`` sample forces (eV/A); target: ``(N, 3)`` reference forces.
        share: this process's part of the global batch (the mean over atoms is global).
        reduce: sums over processes (:func:`blip_ase.training.distributed.all_sum`; None: one process).

    Returns:
        ``(term, nll)``: the differentiable term and the scale-free NLL per force component
        (nats, ``0.5 (log(2 pi s) + mean(log v) + 1)``) for logging.

    Raises:
        ValueError: fewer than 2 samples, or a non-finite variance or error.
    """
    if forces.shape[0] < 2:
        raise ValueError(f"variance_nll needs >= 2 Monte Carlo samples, got {forces.shape[0]}")
    variance = forces.var(0).sum(-1).div(3.0).clamp_min(1e-12)
    ratio = ((forces.mean(0).detach() - target) ** 2).sum(-1).div(3.0) / variance
    log_variance = torch.log(variance)
    sums = [float(ratio.detach().sum()), float(log_variance.detach().sum()), float(ratio.numel())]
    ratio_sum, log_sum, n = reduce(sums) if reduce is not None else sums
    if not (math.isfinite(ratio_sum) and math.isfinite(log_sum)):
        raise ValueError("variance_nll: the Monte Carlo forces or their variances are not finite")
    scale = max(ratio_sum / n, 1e-30)
    term = _scaled(share.atoms, 0.5 * (log_variance.mean() + ratio.mean() / scale))
    return term, 0.5 * (math.log(2 * math.pi * scale) + log_sum / n + 1.0)
