"""What each of 2 gloo processes runs in the distributed-training tests (started by torchrun).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py step OUT BLIP_TRAIN_ARGS...
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py crash BLIP_TRAIN_ARGS...

``step``: one training step of each of :data:`KINDS` on this rank's half of a global batch;
every rank saves its parameters and gradients as ``OUT/<kind>_rank<r>.pt``. Then
``blip train BLIP_TRAIN_ARGS`` (what ``torchrun -m blip_ase.cli.main train ...`` runs), in the
same processes to spare CI a start-up.
``crash``: ``blip train`` whose first training step raises on rank 1 (a stand-in for any failure).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MO_CELLS = Path(__file__).resolve().parent / "data" / "mo_small.extxyz"
GLOBAL_BATCH = 8
KINDS = ("deterministic", "blip", "blip_nll", "orb")  # PaiNN without and with BLIP (blip_nll: with the
# variance scoring rule, loss.nll_weight); BLIP on a small ORB v3


def frames(kind: str) -> list:
    """8 structures whose halves differ in size. PaiNN: rank 0 of 2 takes structures 0, 2, 4, 6
    (both acetylacetones, 15 atoms), rank 1 four NH3 (4 atoms). ORB: Mo cells, one of 53 atoms
    and seven of 54. So the ranks' shares hold different numbers of atoms and edges, and local
    means differ from global ones."""
    from ase.io import read

    if kind == "orb":
        return read(MO_CELLS, "4:12")
    acac = read(EXAMPLES / "acac" / "acac_train_300K.extxyz", ":2")
    nh3 = read(EXAMPLES / "ammonia" / "train.extxyz", ":6")
    return [acac[0], nh3[0], acac[1], *nh3[1:]]


def setup(kind: str):
    """``(cfg, model, data)`` of a tiny float64 model of ``kind`` (BLIP with visible noise and the
    contrastive KL on)."""
    from blip_ase.bayes import BayesConfig
    from blip_ase.models import PaiNNConfig
    from blip_ase.models.orb import OrbConfig
    from blip_ase.training import TrainConfig
    from blip_ase.training.config import LossConfig
    from blip_ase.training.contrastive import ContrastiveConfig
    from blip_ase.training.loop import build_model, fit_normalisation

    cfg = TrainConfig(
        backend="orb" if kind == "orb" else "painn",
        painn=PaiNNConfig(n_features=8, n_interactions=2, n_rbf=6, cutoff=4.0),
        orb=OrbConfig(latent_dim=16, base_mlp_hidden_dim=16, head_mlp_hidden_dim=16, num_message_passing_steps=1),
        bayes=BayesConfig(p0=0.5, kl_weight=1.0, p_init=0.2, hidden=8, n_hidden=1, n_rbf=6),
        contrastive=ContrastiveConfig(weight=1.0),  # BLIP: the contrastive KL's mean is over the global batch too
        loss=LossConfig(nll_weight=1.0 if kind == "blip_nll" else 0.0),
        deterministic=kind == "deterministic", dtype="float64", seed=3, batch_size=GLOBAL_BATCH, progress=False,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    structures = frames(kind)
    model = build_model(cfg, sorted({int(z) for a in structures for z in a.numbers}))
    data = model.make_dataset(structures)
    fit_normalisation(model, data)
    return cfg, model.to(torch.float64), data


def sgd_step(model, batch, cfg, rank: int, *, forward=None) -> None:
    """One :func:`~blip_ase.training.loop.train_step` with plain SGD (Adam's first step is
    ``lr * sign(grad)`` and would hide a wrongly scaled gradient) and rank ``rank``'s noise and
    perturbations (seeded as :func:`~blip_ase.training.loop.train` seeds them)."""
    from blip_ase.training.loop import train_step

    generator, contrastive_generator = generators(cfg, rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, batch, cfg, optimizer, generator, False, contrastive_generator=contrastive_generator,
               forward=forward)  # fmt: skip


def generators(cfg, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """Rank ``rank``'s generators of the training noise and of the contrastive perturbations."""
    from blip_ase.training.distributed import rank_seed

    seeds = (rank_seed(cfg.seed, rank), rank_seed(cfg.contrastive.seed + cfg.seed, rank))
    return tuple(torch.Generator().manual_seed(seed) for seed in seeds)


def step(out: Path, argv: list[str]) -> int:
    from blip_ase.cli.main import main
    from blip_ase.training import distributed

    distributed.start(torch.device("cpu"))
    rank = distributed.rank()
    for kind in KINDS:
        cfg, model, data = setup(kind)
        (indices,) = data.batch_indices(GLOBAL_BATCH, shard=(rank, distributed.world_size()))
        forward = distributed.wrap(model, reduce=not cfg.loss.nll_weight)
        sgd_step(model, data.batch(indices).to("cpu", torch.float64), cfg, rank, forward=forward)
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
