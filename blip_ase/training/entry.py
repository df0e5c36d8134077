"""The training entry point: one model (:mod:`~blip_ase.training.loop`) or a deep ensemble
(:mod:`~blip_ase.training.ensemble`), chosen by ``cfg.ensemble``."""

from __future__ import annotations

from pathlib import Path

from blip_ase.training.config import TrainConfig
from blip_ase.training.ensemble import train_ensemble
from blip_ase.training.loop import initial_model, train_model


def train(
    cfg: TrainConfig, train_path: str | Path, val_path: str | Path, out_dir: str | Path, *, overwrite: bool = False,
    init_checkpoint: str | Path | None = None,
) -> dict:  # fmt: skip
    """Train what ``cfg`` describes and write ``out_dir/model.pt``: with ``cfg.ensemble == 1`` one
    model (:func:`~blip_ase.training.loop.train_model`, also ``out_dir/log.csv``), above 1 an
    ensemble (:func:`~blip_ase.training.ensemble.train_ensemble`, members in ``out_dir/member_<k>/``).

    With ``init_checkpoint`` training fine-tunes that checkpoint's model (its architecture,
    elements and normalisation are kept; ``cfg``'s architecture sections are ignored), for a
    single model and for every member of an ensemble alike (an ensemble checkpoint of
    ``cfg.ensemble`` members gives member ``k`` its member ``k``).

    Returns:
        The summary of :func:`~blip_ase.training.loop.train_model` or
        :func:`~blip_ase.training.ensemble.train_ensemble`.

    Raises:
        FileExistsError: ``out_dir/model.pt`` exists and ``overwrite`` is False.
        ValueError: bad data or config, an ensemble ``init_checkpoint`` of another size than
            ``cfg.ensemble``, or a ``batch_size`` that is not a multiple of the number of processes.
    """
    if cfg.ensemble != 1:
        return train_ensemble(cfg, train_path, val_path, out_dir, overwrite=overwrite, init_checkpoint=init_checkpoint)
    init = None if init_checkpoint is None else initial_model(init_checkpoint)
    return train_model(cfg, train_path, val_path, out_dir, overwrite=overwrite, init_model=init)
