"""One tracker for every monitored trajectory: :class:`Tracker`.

An ASE run (:class:`~blip_ase.md.monitor.UncertaintyMonitor`, :func:`~blip_ase.md.run.run_md`)
has one tracker; a batch of torch-sim walkers (:mod:`blip_ase.md.walkers`) has one per walker,
sharing the writers and the history file. At each check the tracker applies the policy
(:func:`~blip_ase.md.policy.evaluate_frame`, the non-finite MAP override and the physical checks
of :mod:`blip_ase.md.physics`), records the history line, exports a flagged frame to every
writer, keeps the halt bookkeeping (step, check, reason) and summarises all of it, so the two
engines cannot disagree on a verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from ase import Atoms, units

from blip_ase.md.physics import PhysicalChecks, PhysicalState
from blip_ase.md.policy import FrameReport, Thresholds, evaluate_frame, with_halt
from blip_ase.md.schedule import CheckSchedule
from blip_ase.md.writers import FlaggedFrame, FrameWriter, HistoryCSV

ANCHOR_MARGIN = 1.5
"""Safety factor on the anchored screen estimate ``std_0 * bound / bound_0`` (:meth:`Tracker.screen`)."""


class Tracker:
    """Checks, records, exports, halts and summarises one trajectory.

    Args:
        thresholds: the uncertainty policy.
        physical: the physical checks (None or ``enabled=False``: none).
        reference: the start structure (the bond graph the fragmentation check compares with).
        cutoff_A: the model's neighbour cutoff, Angstrom (None: no isolated-atom rule).
        target_K: the thermostat's temperature, K (None or 0: no temperature-runaway check).
        writers: flagged-frame writers.
        history_file: receives one line per check.
        extra: constant columns of this trajectory's history lines and exports (``{"walker": k}``).
        anchor_steps: how long a check with samples anchors the screen's estimate (:meth:`screen`);
            0: never.
        schedule: when checks are due (:meth:`due`); None: whenever the caller checks.

    Attributes:
        history: one dict per check (keys of the history file).
        halted, halt_step, stop_reason, stop_check: the halt (``stop_check``: the names of the
            checks that halted, joined by ``+``); ``last``: the latest report.
        n_checked, n_flagged: counts; n_screened: checks the uncertainty screen cleared without
            Monte Carlo samples (counted in ``n_checked``).
    """

    def __init__(
        self,
        thresholds: Thresholds,
        *,
        physical: PhysicalChecks | None = None,
        reference: Atoms | None = None,
        cutoff_A: float | None = None,
        target_K: float | None = None,
        writers: Sequence[FrameWriter] = (),
        history_file: HistoryCSV | None = None,
        extra: Mapping[str, object] | None = None,
        anchor_steps: int = 0,
        schedule: CheckSchedule | None = None,
    ):
        self.thresholds = thresholds
        self.schedule = schedule
        self.anchor_steps = int(anchor_steps)
        self.anchor: tuple[int, np.ndarray, np.ndarray] | None = None  # last sampled check: step, std, bound
        self.pending: tuple[int, np.ndarray] | None = None  # the bound of a check the screen passed on
        self.physics = None
        if physical is not None and physical.enabled and reference is not None:
            self.physics = PhysicalState(physical, reference, cutoff_A=cutoff_A, target_K=target_K)
        self.writers = list(writers)
        self.history_file = history_file
        self.extra = dict(extra or {})
        self.history: list[dict] = []
        self.halted = False
        self.halt_step: int | None = None
        self.stop_reason: str | None = None
        self.stop_check: str | None = None
        self.last: FrameReport | None = None
        self.n_checked = 0
        self.n_flagged = 0
        self.n_screened = 0

    def due(self, step: int) -> bool:
        """Whether ``step`` needs a check (always, without a schedule)."""
        return self.schedule is None or self.schedule.due(step)

    def resume(self, history: list[dict]) -> None:
        """Continue the counts of an earlier session (a restart) from its history lines."""
        self.history = list(history)
        self.n_checked = len(self.history)
        self.n_flagged = sum(r["level"] >= 1 for r in self.history)
        self.n_screened = sum(np.isfinite(r.get("screen_bound", np.nan)) for r in self.history)
        if self.schedule is not None and self.history:  # the last step was checked: the next is one interval on
            self.schedule.checked(int(self.history[-1]["step"]), float("nan"))

    def check(
        self,
        atoms: Atoms,
        stats: Mapping[str, np.ndarray],
        *,
        step: int,
        time_fs: float,
        temperature_K: float,
        map_bad: Sequence[str] = (),
        physical: Sequence[tuple[str, str]] | None = None,
    ) -> FrameReport:
        """The verdict on ``atoms`` at ``step``, recorded, exported and (level 2) halting.

        Args:
            atoms: the configuration (copied where it is kept).
            stats: its Monte Carlo statistics (``energy`` eV, ``forces (n, 3)`` eV/A,
                ``energy_variance`` eV^2, ``forces_variance (n,)`` eV^2/A^2, optional stress).
            step, time_fs: where the trajectory is.
            temperature_K: the instantaneous temperature, K.
            map_bad: keys of the MAP prediction (which moves the atoms) that are not finite.
            physical: the physical checks' halts of this frame when :meth:`screen` already ran
                them (they keep state between checks, so they run once per check); None: run here.
        """
        report = evaluate_frame(stats, atoms, self.thresholds)
        if map_bad and report.level < 2:  # the MAP forces that drive the dynamics are unusable
            report = with_halt(report, [("non_finite", "non-finite prediction: MAP " + ", ".join(map_bad))])
        if physical is None and self.physics is not None:
            physical = self.physical_halts(atoms, float(stats["energy"]), temperature_K)
        report = with_halt(report, physical or [])
        if self.pending is not None and self.pending[0] == int(step) and np.isfinite(report.force_std).all():
            self.anchor = (int(step), np.asarray(report.force_std, dtype=float), self.pending[1])
        self.pending = None
        ratio = self._ratio(atoms, report.force_std) if report.level == 0 else float("inf")
        return self.record(atoms, stats, report, step=step, time_fs=time_fs, temperature_K=temperature_K,
                           ratio=ratio)  # fmt: skip

    def _ratio(self, atoms: Atoms, force_std: np.ndarray) -> float:
        """The largest ratio of an atom's force std to its limit (NaN: no per-atom limits)."""
        limits = self.thresholds.screen_limits(atoms.get_chemical_symbols())
        if limits is None:
            return float("nan")
        with np.errstate(invalid="ignore"):
            return float(np.max(np.asarray(force_std, dtype=float) / limits, initial=0.0))

    def physical_halts(self, atoms: Atoms, energy_eV: float, temperature_K: float) -> list[tuple[str, str]]:
        """The physical checks of this frame (potential energy ``energy_eV``); none without them."""
        if self.physics is None:
            return []
        energy = energy_eV + 1.5 * len(atoms) * units.kB * temperature_K
        return self.physics.check(atoms, energy_eV=energy, temperature_K=temperature_K)

    def screen(
        self, atoms: Atoms, *, energy_eV: float, bound: np.ndarray, step: int, time_fs: float, temperature_K: float
    ) -> FrameReport | list[tuple[str, str]]:
        """A check that the uncertainty screen may clear without Monte Carlo samples.

        The physical checks run first (on the MAP energy ``energy_eV``). When none objects and the
        screen's estimate is below every atom's limit (:meth:`~blip_ase.md.policy.Thresholds.screen_limits`),
        the check is recorded as screened (level 0; the measured metrics ``nan``, ``screen_bound``
        the largest estimate) and its report returned. Otherwise nothing is recorded and the
        physical halts are returned, to pass to :meth:`check` after the Monte Carlo samples.

        The estimate is ``bound`` (``(n,)`` eV/A, the screen's conservative bound on each atom's
        calibrated force std) or, within ``anchor_steps`` of the last check with samples, the
        smaller of it and :data:`ANCHOR_MARGIN` times that check's measured std scaled by how much
        the bound changed since (``std_0 * bound / bound_0``): the screen's error for this
        trajectory cancels in the ratio.
        """
        halts = self.physical_halts(atoms, energy_eV, temperature_K)
        limits = self.thresholds.screen_limits(atoms.get_chemical_symbols())
        bound = np.asarray(bound, dtype=float)
        estimate = bound
        if self.anchor is not None and step - self.anchor[0] <= self.anchor_steps:
            _, std_0, bound_0 = self.anchor
            estimate = np.minimum(bound, ANCHOR_MARGIN * std_0 * bound / np.maximum(bound_0, 1e-12))
        if halts or limits is None or not bool((estimate < limits).all()):
            self.pending = (int(step), bound)
            return halts
        n, nan = len(atoms), float("nan")
        report = FrameReport(
            force_std=np.full(n, nan), relative_force_std=np.full(n, nan), max_force_std=nan,
            max_relative_force_std=nan, energy_std=nan, energy_std_per_atom=nan, level=0, reason="",
            flagged_atoms=np.zeros(n, bool),
        )  # fmt: skip
        self.n_screened += 1
        return self.record(atoms, None, report, step=step, time_fs=time_fs, temperature_K=temperature_K,
                           screen_bound=float(np.max(estimate)), ratio=float(np.max(estimate / limits)))  # fmt: skip

    def record(
        self, atoms: Atoms, stats: Mapping | None, report: FrameReport, *, step: int, time_fs: float,
        temperature_K: float, screen_bound: float = float("nan"), ratio: float = float("nan"),
    ) -> FrameReport:  # fmt: skip
        """Write the history line of ``report``, export a flagged frame, keep the halt and tell the
        schedule (``ratio``: the largest force std over its limit, NaN: unknown)."""
        record = {
            **self.extra,
            "step": int(step),
            "time_fs": time_fs,
            "temperature_K": float(temperature_K),
            "max_force_std": report.max_force_std,
            "max_relative_force_std": report.max_relative_force_std,
            "energy_std": report.energy_std,
            "energy_std_per_atom": report.energy_std_per_atom,
            "level": report.level,
            "check": "+".join(report.checks),
            "screen_bound": screen_bound,
        }
        self.history.append(record)
        self.n_checked += 1
        if self.schedule is not None:
            self.schedule.checked(step, ratio)
        self.last = report
        if self.history_file is not None:
            self.history_file.write(record)
        if report.level >= 1:
            self.export(atoms, stats, report, int(step), time_fs)
        if report.level == 2:
            self.halted, self.halt_step = True, int(step)
            self.stop_reason = f"step {step}: {report.reason}"
            self.stop_check = "+".join(report.checks)
        return report

    def export(self, atoms: Atoms, stats: Mapping, report: FrameReport, step: int, time_fs: float) -> None:
        """Write the frame to every writer."""
        frame = FlaggedFrame(
            atoms=atoms.copy(),
            step=step,
            time_fs=time_fs,
            reason=report.reason,
            flagged_atoms=report.flagged_atoms,
            energy=float(stats["energy"]),
            energy_variance=float(stats["energy_variance"]),
            forces=np.asarray(stats["forces"]),
            forces_variance=np.asarray(stats["forces_variance"]),
            stress=np.asarray(stats["stress"]) if "stress" in stats else None,
            stress_variance=np.asarray(stats["stress_variance"]) if "stress_variance" in stats else None,
            extra=dict(self.extra),
        )
        for writer in self.writers:
            writer.write(frame)
        self.n_flagged += 1

    def rearm(self, step: int) -> None:
        """Start the physical checks and the schedule afresh at ``step`` (a respawned walker); the
        last halt stays recorded."""
        self.halted = False
        if self.schedule is not None:
            self.schedule.reset(step)
        self.anchor = self.pending = None
        if self.physics is not None:
            self.physics.reset()

    def summary(self) -> dict:
        """Counts, the halt and the force-std statistics over finite values (NaN frames halt)."""
        stds = [r["max_force_std"] for r in self.history if np.isfinite(r["max_force_std"])]
        return {
            "n_checked": self.n_checked,
            "n_flagged": self.n_flagged,
            "n_screened": self.n_screened,
            "halted": self.halted,
            "halt_step": self.halt_step,
            "stop_reason": self.stop_reason,
            "stop_check": self.stop_check,
            "max_force_std_max": max(stds) if stds else None,
            "max_force_std_mean": float(np.mean(stds)) if stds else None,
        }
