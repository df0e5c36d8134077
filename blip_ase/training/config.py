"""Training configuration: frozen dataclasses loaded from YAML by :mod:`blip_ase.configuration`.

``from_dict`` and ``with_overrides`` are re-exported from there (the one loader of every config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from blip_ase.bayes import BayesConfig
from blip_ase.configuration import checked_int, from_dict, load_yaml, with_overrides
from blip_ase.models.orb import OrbConfig
from blip_ase.models.painn import PaiNNConfig
from blip_ase.training.contrastive import ContrastiveConfig

__all__ = ["LossConfig", "OptimConfig", "TrainConfig", "from_dict", "load_config", "with_overrides"]


@dataclass(frozen=True)
class LossConfig:
    """ELBO data terms.

    Attributes:
        kind: ``l1`` (MAE), ``l2`` (MSE) or ``huber``.
        energy_weight, forces_weight, stress_weight: weights of the per-structure energy,
            per-component force and per-component stress errors.
        huber_delta: delta of the Huber loss (eV, eV/A, eV/A^3).
        nll_weight: weight of a proper scoring rule for the force variances
            (:func:`~blip_ase.training.loss.variance_nll`): the Gaussian NLL of the forces under the
            spread of ``nll_samples`` Monte Carlo samples per step, after the NLL-optimal variance
            scale, so it trains how the variances follow the errors and not their overall size
            (Bayesian models only; 0: off, one sample per step).
        nll_samples: Monte Carlo samples per step while ``nll_weight`` > 0 (>= 2; the data terms
            are then averaged over them).
    """

    kind: Literal["l1", "l2", "huber"] = "l1"
    energy_weight: float = 0.1
    forces_weight: float = 1.0
    stress_weight: float = 0.0
    huber_delta: float = 0.01
    nll_weight: float = 0.0
    nll_samples: int = 2

    def __post_init__(self):
        weight = self.nll_weight
        if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"loss.nll_weight must be a finite number >= 0, got {self.nll_weight!r}")
        checked_int(self.nll_samples, least=2, name="loss.nll_samples")  # a variance needs 2 samples


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and stopping.

    Attributes:
        optimizer: ``adam`` or ``adamw``. lr: learning rate of the potential.
        posterior_lr: learning rate of the inference network (None: same as ``lr``).
        weight_decay: AdamW/Adam weight decay.
        scheduler: ``plateau`` (ReduceLROnPlateau on validation loss), ``cosine`` (with linear
            warmup over ``warmup_fraction`` of the steps) or ``none``.
        plateau_factor, plateau_patience: ReduceLROnPlateau settings (patience in epochs).
        grad_clip: max gradient norm (None: no clipping).
        early_stopping_patience: stop after this many epochs without a better validation loss
            (None: never).
        ema_decay: keep an exponential moving average of the weights, ``avg = d * avg + (1 - d) *
            weights`` after every optimiser step; validation, model selection and the checkpoint
            use the averaged weights, training continues from its own (None: off; the average
            spans about ``1 / (1 - d)`` steps).
    """

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    posterior_lr: float | None = None
    weight_decay: float = 0.0
    scheduler: Literal["plateau", "cosine", "none"] = "plateau"
    plateau_factor: float = 0.5
    plateau_patience: int = 30
    warmup_fraction: float = 0.05
    grad_clip: float | None = None
    early_stopping_patience: int | None = None
    ema_decay: float | None = None

    def __post_init__(self):
        checked_int(self.plateau_patience, least=0, name="plateau_patience")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, float) and 0.0 < self.ema_decay < 1.0):
            raise ValueError(f"optim.ema_decay must be a number in (0, 1) or null, got {self.ema_decay!r}")
        if self.early_stopping_patience is not None:
            checked_int(self.early_stopping_patience, least=1, name="early_stopping_patience")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``blip train`` needs besides the data files.

    Attributes:
        backend: model family: ``painn`` (from scratch) or ``orb`` (ORB v3 from orb-models,
            fine-tuned from a local weights file or trained from a random initialisation).
        painn: PaiNN architecture (backend ``painn``).
        orb: ORB v3 base model (backend ``orb``): named model, weights file, architecture.
        bayes: BLIP settings; ``deterministic: true`` ignores them and trains plain linears.
        deterministic: train the same architecture without BLIP.
        loss, optim: see :class:`LossConfig`, :class:`OptimConfig`.
        epochs, batch_size: training length and mini-batch size (structures).
        elements: atomic numbers the model knows (None: those in the training data).
        seed: seeds initialisation, shuffling and the training noise.
        dtype: ``float32`` or ``float64``. device: ``cpu``, ``cuda``, or None for auto.
        progress: show a progress bar.
        contrastive: the noise-contrastive prior (KL on perturbed copies; weight 0 = off).
        kl_warmup_epochs: both KL weights rise linearly to their value over this many epochs (epoch
            ``k`` gets ``(k + 1) / N`` of it; 0: off).
        select_by: which epoch's model is kept: ``val_loss`` (MAP validation data loss) or
            ``mc_nll`` (Gaussian NLL of the validation forces under ``select_samples`` Monte
            Carlo samples, after the NLL-optimal variance scale, so it rewards how well the
            variances rank the errors, not their overall size; Bayesian models only).
        select_samples: Monte Carlo samples for ``mc_nll`` (fixed seeds: the same draws every epoch).
        ensemble: number of independently seeded members (seeds ``seed, seed + 1, ...``); above 1,
            ``blip train`` trains each into ``OUT/member_<k>/`` and writes the ensemble checkpoint
            ``OUT/model.pt`` (a deep ensemble: with ``deterministic: true``).
    """

    backend: Literal["painn", "orb"] = "painn"
    painn: PaiNNConfig = field(default_factory=PaiNNConfig)
    orb: OrbConfig = field(default_factory=OrbConfig)
    bayes: BayesConfig = field(default_factory=BayesConfig)
    deterministic: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 500
    batch_size: int = 64
    elements: list[int] | None = None
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: str | None = None
    progress: bool = True
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    kl_warmup_epochs: int = 0
    select_by: Literal["val_loss", "mc_nll"] = "val_loss"
    select_samples: int = 8
    ensemble: int = 1

    def __post_init__(self):
        for name, least in (("epochs", 1), ("batch_size", 1), ("seed", 0), ("kl_warmup_epochs", 0), ("ensemble", 1)):
            checked_int(getattr(self, name), least=least, name=name)
        checked_int(self.select_samples, least=2, name="select_samples")  # a variance needs 2 samples
        if self.loss.nll_weight and (self.deterministic or self.bayes.method != "blip"):
            kind = "a deterministic model" if self.deterministic else f"bayes.method {self.bayes.method!r}"
            raise ValueError(f"loss.nll_weight > 0 trains BLIP's inference network: set it to 0 for {kind}")


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a YAML file into :class:`TrainConfig`.

    Relative paths in the file (``orb.weights_path``) are relative to the file's directory.
    ``overrides`` replace top-level fields (None: keep the file's value), through the same
    checks as the file's values (see :mod:`blip_ase.configuration`).

    Raises:
        FileNotFoundError: no such file. ValueError: an unknown key or a bad value (named).
    """
    return load_yaml(path, TrainConfig, {k: v for k, v in overrides.items() if v is not None})
