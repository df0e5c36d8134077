"""Distributed data-parallel training: torch.distributed and DistributedDataParallel, started by torchrun.

``torchrun --nproc-per-node N -m blip_ase.cli.main train ...`` (or ``blip train --nproc N``)
starts N processes; :func:`start` joins them into one process group (gloo on CPU, NCCL on GPU,
one GPU per process: ``cuda:LOCAL_RANK``). The conventions, written once here:

- ``batch_size`` is the *global* batch, as in a single process: each step, rank ``r`` of ``N``
  takes structures ``r, r + N, ...`` of the global batch, so ``batch_size`` must be a multiple
  of N. The epoch's order (the same seeded permutation on every rank) is padded with its first
  structures to a multiple of N, as :class:`torch.utils.data.DistributedSampler` pads.
- DDP averages the ranks' gradients; every mean in the loss is taken over the global batch
  (:class:`~blip_ase.training.loss.Share`, from all-reduced counts of structures, atoms, edges
  and nodes), so the gradient equals the single-process gradient of the same global batch.
- Validation: rank ``r`` evaluates validation batches ``r, r + N, ...`` (the single-process
  batches) and the sums are all-reduced, so every rank sees the single-process metrics and keeps
  the same epoch. Only rank 0 writes ``model.pt``, ``log.csv`` and the progress bar.
- Rank 0 draws the training noise from the seed itself (one process trains as before); rank
  ``r > 0`` from a seed derived from ``(seed, r)``. A seed gives the same model for the same N.
- A rank that fails ends its process; torchrun then stops the others. A collective that waits
  longer than :data:`TIMEOUT` (a peer that hangs, or died on another node) raises.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
from torch import distributed as dist

from blip_ase.bayes import Coefficients
from blip_ase.data.dataset import Batch
from blip_ase.devices import resolve_device
from blip_ase.training.loss import Share

T = TypeVar("T")

TIMEOUT = timedelta(minutes=10)


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints."""
    return rank() == 0


def start(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment); a
    no-op in a single process or when a group exists already.

    Args:
        device: the configured device; a CUDA device becomes ``cuda:LOCAL_RANK``.

    Returns:
        The device of this process.

    Raises:
        ValueError: more processes on this machine than GPUs (from :func:`~blip_ase.devices.resolve_device`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or not dist.is_available():
        return device
    if device.type == "cuda":
        device = resolve_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def finish() -> None:
    """Leave the process group (after training, before the process exits), all ranks together:
    a barrier first, since ``destroy_process_group`` while a peer is still busy can hang
    (pytorch/pytorch#75097; a 2-rank CI run hung once in it, after training had finished)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, *, reduce: bool = True) -> torch.nn.Module:
    """The module whose forward the training step runs: ``model`` itself in a single process or
    with ``reduce=False`` (the step averages the gradients by hand, :func:`average`), else its
    DistributedDataParallel wrapper (gradients averaged over ranks in ``backward``).
    Inputs must be on the model's device already (``device_ids=None``). Some parameters may
    get no gradient (ORB v3's decoder, confidence and reference-energy heads): with
    ``static_graph`` DDP finds them in the first step (the same parameters are used every step),
    averages the others and leaves theirs unset, as one process does."""
    if not active() or not reduce:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, forward_sync_buffers=False, static_graph=True)


def check_batch_size(batch_size: int, n: int) -> None:
    """Raises ValueError unless the global ``batch_size`` splits evenly over ``n`` processes."""
    if batch_size % n:
        raise ValueError(
            f"batch_size {batch_size} is the global batch and must be a multiple of the number of processes, {n}"
        )


def rank_seed(seed: int, rank: int) -> int:
    """The noise seed of ``rank``: ``seed`` on rank 0, a seed derived from ``(seed, rank)`` elsewhere."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def all_sum(values: Sequence[float]) -> list[float]:
    """``values`` summed over ranks (float64; unchanged in a single process)."""
    if not active():
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def average(tensors: Sequence[torch.Tensor]) -> None:
    """Average each tensor over ranks in place, as DDP averages gradients (nothing in a single
    process): the gradients of a model not wrapped in DDP (:func:`wrap` with ``reduce=False``)."""
    if active():
        for t in tensors:
            dist.all_reduce(t)
            t /= world_size()


def shares(counts: Sequence[int]) -> list[float]:
    """``world * local / global`` for each count: the factor that turns a mean over this rank's
    items into its part of the global mean, times the number of ranks (DDP averages gradients).
    1 in a single process and where the global count is 0."""
    if not active():
        return [1.0] * len(counts)
    n = world_size()
    return [n * c / total if total else 1.0 for c, total in zip(counts, all_sum(counts))]


def batch_share(batch: Batch, coefficients: Coefficients | None) -> Share:
    """This rank's :class:`~blip_ase.training.loss.Share` of the global batch ``batch`` is part of
    (one all-reduce of four counts)."""
    rows = (0, 0) if coefficients is None else (coefficients.edge.shape[0], coefficients.node.shape[0])
    return Share(*shares([batch.energy.numel(), batch.forces.shape[0], *rows]))


def own(items: Iterable[T]) -> Iterator[T]:
    """Items ``rank, rank + N, ...`` of ``items`` (all of them in a single process)."""
    return itertools.islice(items, rank(), None, world_size())
