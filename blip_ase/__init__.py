"""blip-ase: Bayesian Learned Interatomic Potentials as ASE calculators."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["BLIPCalculator", "__version__"]


def __getattr__(name: str):
    # Lazy: importing blip_ase (e.g. for `blip --help`) must not import torch.
    if name == "BLIPCalculator":
        from blip_ase.calculator import BLIPCalculator

        return BLIPCalculator
    raise AttributeError(f"module 'blip_ase' has no attribute {name!r}")
