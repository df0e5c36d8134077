"""Active learning: uncertainty-monitored exploration, selection, oracle labelling, fine-tuning (``blip learn``).

Lazy: labelling workers import :mod:`blip_ase.active.oracle` alone, without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LearnConfig": "blip_ase.active.config",
    "LoopState": "blip_ase.active.state",
    "read_state": "blip_ase.active.state",
    "load_learn_config": "blip_ase.active.config",
    "run_learn": "blip_ase.active.loop",
    "descriptors": "blip_ase.active.selection",
    "farthest_point_sampling": "blip_ase.active.selection",
    "select": "blip_ase.active.selection",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'blip_ase.active' has no attribute {name!r}")
