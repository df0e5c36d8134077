"""The ELBO loss: weighted energy, force and stress errors plus lambda * KL."""

from __future__ import annotations

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
    """Negative ELBO of one Monte Carlo sample.

    Args:
        out: model output for ``S = 1`` sample: energy ``(1, G)``, forces ``(1, N, 3)``,
            optionally stress ``(1, G, 3, 3)``.
        batch: reference labels.
        coefficients: alpha/beta of the batch (None for a deterministic model: no KL).
        share: this process's part of the global batch (distributed training).

    Returns:
        ``(loss, parts)`` with the float values of each term for logging.
    """
    terms = {
        "energy": _scaled(share.structures, error(out["energy"][0], batch.energy, cfg)),
        "forces": _scaled(share.atoms, error(out["forces"][0], batch.forces, cfg)),
    }
    loss = cfg.energy_weight * terms["energy"] + cfg.forces_weight * terms["forces"]
    if cfg.stress_weight and batch.stress is not None:
        terms["stress"] = _scaled(share.structures, error(out["stress"][0], batch.stress, cfg))
        loss = loss + cfg.stress_weight * terms["stress"]
    if coefficients is not None and kl_weight:
        terms["kl"] = kl_divergence(coefficients, p0, weights=(share.edges, share.nodes))
        loss = loss + kl_weight * terms["kl"]
    return loss, {k: float(v.detach()) for k, v in terms.items()}
