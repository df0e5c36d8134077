"""What each of 2 gloo processes runs in the distributed-training tests (started by torchrun).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py step OUT BLIP_TRAIN_ARGS...
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py crash BLIP_TRAIN_ARGS...

``step``: one training step of a deterministic and of a BLIP model on this rank's half of a
global batch; every rank saves its parameters and gradients as ``OUT/<kind>_rank<r>.pt``. Then
``blip train BLIP_TRAIN_ARGS`` (what ``torchrun -m blip_ase.cli.main train ...`` runs), in the
same processes to spare CI a start-up.
``crash``: ``blip train`` whose first training step raises on rank 1 (a stand-in for any failure).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GLOBAL_BATCH = 8


def mixed_frames() -> list:
    """8 structures of unequal size (acetylacetone: 15 atoms, NH3: 4): rank 0 of 2 takes
    structures 0, 2, 4, 6 (both acetylacetones), rank 1 four NH3, so the ranks' shares of the
    batch hold different numbers of atoms and edges, and local means differ from global ones."""
    from ase.io import read

    acac = read(EXAMPLES / "acac" / "acac_train_300K.extxyz", ":2")
    nh3 = read(EXAMPLES / "ammonia" / "train.extxyz", ":6")
    return [acac[0], nh3[0], acac[1], *nh3[1:]]


def setup(deterministic: bool):
    """``(cfg, model, data)``: a tiny float64 PaiNN (BLIP with visible noise, or deterministic)."""
    from blip_ase.bayes import BayesConfig
    from blip_ase.models import PaiNNConfig
    from blip_ase.training import TrainConfig
    from blip_ase.training.loop import build_model, fit_normalisation

    cfg = TrainConfig(
        painn=PaiNNConfig(n_features=8, n_interactions=2, n_rbf=6, cutoff=4.0),
        bayes=BayesConfig(p0=0.5, kl_weight=1.0, p_init=0.2, hidden=8, n_hidden=1, n_rbf=6),
        deterministic=deterministic, dtype="float64", seed=3, batch_size=GLOBAL_BATCH, progress=False,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, [1, 6, 7, 8])
    data = model.make_dataset(mixed_frames())
    fit_normalisation(model, data)
    return cfg, model.to(torch.float64), data


def sgd_step(model, batch, cfg, rank: int, *, forward=None) -> None:
    """One :func:`~blip_ase.training.loop.train_step` with plain SGD (Adam's first step is
    ``lr * sign(grad)`` and would hide a wrongly scaled gradient) and rank ``rank``'s noise."""
    from blip_ase.training.distributed import rank_seed
    from blip_ase.training.loop import train_step

    generator = torch.Generator().manual_seed(rank_seed(cfg.seed, rank))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, batch, cfg, optimizer, generator, False, forward=forward)


def step(out: Path, argv: list[str]) -> int:
    from blip_ase.cli.main import main

    from blip_ase.training import distributed

    distributed.start(torch.device("cpu"))
    rank = distributed.rank()
    for kind in ("deterministic", "blip"):
        cfg, model, data = setup(kind == "deterministic")
        (indices,) = data.batch_indices(GLOBAL_BATCH, shard=(rank, distributed.world_size()))
        sgd_step(model, data.batch(indices).to("cpu", torch.float64), cfg, rank, forward=distributed.wrap(model))
        grads = {name: p.grad for name, p in model.named_parameters()}
        torch.save({"grads": grads, "params": model.state_dict()}, out / f"{kind}_rank{rank}.pt")
    return main(["train", *argv])


def crash(argv: list[str]) -> int:
    import os

    from blip_ase.cli.main import main
    from blip_ase.training import loop

    if os.environ["RANK"] == "1":
        def fail(*args, **kwargs):
            raise RuntimeError("injected failure in the first training step on rank 1")

        loop.train_step = fail
    return main(["train", *argv])


if __name__ == "__main__":
    sys.exit(step(Path(sys.argv[2]), sys.argv[3:]) if sys.argv[1] == "step" else crash(sys.argv[2:]))
