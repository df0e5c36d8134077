"""Exponential moving average (EMA) of a model's weights during training (``optim.ema_decay``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    """EMA of every parameter of ``model``: after each optimiser step ``avg = d * avg + (1 - d) * p``.

    Args:
        model: the module being trained (its parameters are read, never replaced).
        decay: ``d`` in (0, 1); the average spans about ``1 / (1 - d)`` steps.

    Raises:
        ValueError: ``decay`` outside (0, 1).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.average = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the current parameters of ``model`` into the average (call after each step)."""
        for avg, p in zip(self.average, model.parameters(), strict=True):
            avg.lerp_(p.detach(), 1.0 - self.decay)

    @contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[None]:
        """Within the block ``model`` holds the averaged weights; its own are restored after."""
        params = list(model.parameters())
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, avg in zip(params, self.average, strict=True):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, own in zip(params, saved, strict=True):
                    p.copy_(own)
