"""Deep ensembles for ``blip train`` (``ensemble: N`` in the config, or ``--ensemble N``).

Depends on :mod:`blip_ase.training.loop` (each member is one :func:`~blip_ase.training.loop.train_model`);
the loop knows nothing of ensembles, and :func:`blip_ase.training.train` chooses between the two.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from blip_ase.configuration import checked_int
from blip_ase.models.checkpoint import save_checkpoint
from blip_ase.models.ensemble import EnsemblePotential
from blip_ase.training import distributed
from blip_ase.training.config import TrainConfig
from blip_ase.training.loop import initial_model, train_model


def train_ensemble(
    cfg: TrainConfig, train_path: str | Path, val_path: str | Path, out_dir: str | Path, *, overwrite: bool = False,
    init_checkpoint: str | Path | None = None,
) -> dict:  # fmt: skip
    """Train ``cfg.ensemble`` members with seeds ``cfg.seed + k`` into ``out_dir/member_<k>/`` and
    write the ensemble checkpoint ``out_dir/model.pt``.

    With ``init_checkpoint`` every member fine-tunes from it (see
    :func:`~blip_ase.training.loop.initial_model`: a single model's checkpoint is every member's
    start, an ensemble checkpoint of ``cfg.ensemble`` members gives member ``k`` its member ``k``);
    the members then differ by their seeds (data order, training noise).

    Returns:
        Summary: the members' summaries, the checkpoint path and the wall time.

    Raises:
        ValueError: ``cfg.ensemble < 2``, or an ensemble ``init_checkpoint`` of another size.
        FileExistsError: ``out_dir/model.pt`` exists and ``overwrite`` is False.
    """
    n = checked_int(cfg.ensemble, least=2, name="ensemble")
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "model.pt"
    if ckpt_path.exists() and not overwrite:
        raise FileExistsError(f"{ckpt_path} exists; pass --overwrite to replace it")
    if init_checkpoint is not None:
        initial_model(init_checkpoint, member=0, members=n)  # refuse a mismatch before any training
    start = time.perf_counter()
    members = []
    for k in range(n):
        member_cfg = dataclasses.replace(cfg, ensemble=1, seed=cfg.seed + k)
        init = None if init_checkpoint is None else initial_model(init_checkpoint, member=k, members=n)
        members.append(train_model(member_cfg, train_path, val_path, out_dir / f"member_{k}", overwrite=overwrite,
                                   init_model=init))  # fmt: skip
    if distributed.is_main():  # distributed training: every member across all processes, rank 0 writes
        ensemble = EnsemblePotential.from_checkpoints([m["checkpoint"] for m in members])
        meta = {"config": dataclasses.asdict(cfg), "members": members}
        if init_checkpoint is not None:
            meta["init_checkpoint"] = str(init_checkpoint)
        save_checkpoint(ckpt_path, ensemble, training=meta)
    return {"members": members, "checkpoint": str(ckpt_path), "seconds": time.perf_counter() - start}
