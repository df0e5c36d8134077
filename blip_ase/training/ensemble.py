"""Deep ensembles for ``blip train`` (``ensemble: N`` in the config, or ``--ensemble N``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from blip_ase.models.checkpoint import save_checkpoint
from blip_ase.models.ensemble import EnsemblePotential
from blip_ase.training import distributed
from blip_ase.training.config import TrainConfig


def train_ensemble(
    cfg: TrainConfig, train_path: str | Path, val_path: str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> dict:
    """Train ``cfg.ensemble`` members with seeds ``cfg.seed + k`` into ``out_dir/member_<k>/`` and
    write the ensemble checkpoint ``out_dir/model.pt``.

    Returns:
        Summary: the members' summaries, the checkpoint path and the wall time.

    Raises:
        ValueError: ``cfg.ensemble < 2``.
        FileExistsError: ``out_dir/model.pt`` exists and ``overwrite`` is False.
    """
    from blip_ase.training.loop import train

    if isinstance(cfg.ensemble, bool) or not isinstance(cfg.ensemble, int) or cfg.ensemble < 2:
        raise ValueError(f"ensemble must be an integer >= 2 (or 1 for a single model), got {cfg.ensemble!r}")
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "model.pt"
    if ckpt_path.exists() and not overwrite:
        raise FileExistsError(f"{ckpt_path} exists; pass --overwrite to replace it")
    start = time.perf_counter()
    members = []
    for k in range(cfg.ensemble):
        member_cfg = dataclasses.replace(cfg, ensemble=1, seed=cfg.seed + k)
        members.append(train(member_cfg, train_path, val_path, out_dir / f"member_{k}", overwrite=overwrite))
    if distributed.is_main():  # distributed training: every member across all processes, rank 0 writes
        ensemble = EnsemblePotential.from_checkpoints([m["checkpoint"] for m in members])
        meta = {"config": dataclasses.asdict(cfg), "members": members}
        save_checkpoint(ckpt_path, ensemble, training=meta)
    return {"members": members, "checkpoint": str(ckpt_path), "seconds": time.perf_counter() - start}
