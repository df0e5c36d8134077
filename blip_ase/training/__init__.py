"""Training, losses and configuration (the sibling of the inference-side packages)."""

from blip_ase.training.config import LossConfig, OptimConfig, TrainConfig, load_config, with_overrides
from blip_ase.training.loop import train

__all__ = ["LossConfig", "OptimConfig", "TrainConfig", "load_config", "train", "with_overrides"]
