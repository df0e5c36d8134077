"""Training, losses and configuration (the sibling of the inference-side packages).

:func:`train` is the entry point (one model or a deep ensemble); module dependencies run one way:
``entry -> ensemble -> loop -> config``.
"""

from blip_ase.training.config import LossConfig, OptimConfig, TrainConfig, load_config, with_overrides
from blip_ase.training.entry import train

__all__ = ["LossConfig", "OptimConfig", "TrainConfig", "load_config", "train", "with_overrides"]
