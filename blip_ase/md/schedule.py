"""When a trajectory's next uncertainty check is due: :class:`CheckSchedule`.

A fixed schedule checks every ``interval`` steps. An adaptive one (``max_interval > interval``)
doubles the gap after a check whose uncertainty was far below the flag threshold (every atom's
std, or the screen's estimate of it, below ``quiet`` times the atom's limit), up to
``max_interval``, and falls back to ``interval`` after any other check (a flag, a halt, a
physical check that objected, thresholds that give no per-atom limit, a non-finite value).
GPUMD and DP-GEN evaluate their committees every few steps for the same reason: a trajectory
far from its thresholds rarely crosses them within a few steps.

Checks land on multiples of ``interval`` (from step 0; a check off that
grid, such as a respawned walker's first, is followed by one on it), so the walkers of a batch
that are due together share one batched check. No gap exceeds ``max_interval``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blip_ase.configuration import checked_int

QUIET_RATIO = 0.3
"""A check is quiet when every atom's (estimated) force std is below this fraction of its limit
(chosen by ``md_scripts/bench_detection.py``: 0.5 lost 20 % of the flags on a hot mix, 0.3 lost 8 %)."""
MAX_INTERVAL_FACTOR = 4
"""``MDConfig.uq_max_interval`` None means this many times ``uq_interval``."""


@dataclass
class CheckSchedule:
    """The check steps of one trajectory.

    Args:
        interval: steps between checks near the thresholds (and of a fixed schedule).
        max_interval: the largest gap between two checks (None or ``interval``: fixed schedule).
        quiet: see :data:`QUIET_RATIO`.

    Raises:
        ValueError: ``interval < 1``, ``max_interval < interval`` or ``quiet`` not in (0, 1].
    """

    interval: int
    max_interval: int | None = None
    quiet: float = QUIET_RATIO
    gap: int = field(init=False)
    next_step: int = field(init=False)

    def __post_init__(self):
        self.interval = checked_int(self.interval, least=1, name="uq_interval")
        if self.max_interval is None:
            self.max_interval = self.interval
        self.max_interval = checked_int(self.max_interval, least=self.interval, name="uq_max_interval (>= uq_interval)")
        if isinstance(self.quiet, bool) or not isinstance(self.quiet, (int, float)) or not 0.0 < self.quiet <= 1.0:
            raise ValueError(f"uq_quiet_ratio must be a number in (0, 1], got {self.quiet!r}")
        self.gap, self.next_step = self.interval, 0

    def due(self, step: int) -> bool:
        """Whether ``step`` needs a check."""
        return int(step) >= self.next_step

    def checked(self, step: int, ratio: float) -> None:
        """Record a check at ``step`` whose largest ratio of (estimated) force std to its limit is
        ``ratio`` (NaN: unknown) and set the next due step."""
        quiet = bool(np.isfinite(ratio)) and ratio < self.quiet
        self.gap = min(2 * self.gap, self.max_interval) if quiet else self.interval
        next_step = -(-(int(step) + self.gap) // self.interval) * self.interval  # on the grid
        if next_step - int(step) > self.max_interval:  # a check off the grid (a respawn)
            next_step -= self.interval
        self.next_step = next_step

    def reset(self, step: int) -> None:
        """Check at ``step`` and go back to the base interval (a respawned walker)."""
        self.gap, self.next_step = self.interval, int(step)
