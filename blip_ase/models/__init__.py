"""Backends: a common :class:`Potential` interface, PaiNN, and checkpoint files."""

from blip_ase.models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from blip_ase.models.painn import PaiNN, PaiNNConfig
from blip_ase.models.potential import BACKENDS, PaiNNPotential, Potential

__all__ = [
    "BACKENDS",
    "CheckpointError",
    "PaiNN",
    "PaiNNConfig",
    "PaiNNPotential",
    "Potential",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
