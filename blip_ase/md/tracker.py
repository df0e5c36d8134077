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
from blip_ase.md.writers import FlaggedFrame, FrameWriter, HistoryCSV


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

    Attributes:
        history: one dict per check (keys of the history file).
        halted, halt_step, stop_reason, stop_check: the halt (``stop_check``: the names of the
            checks that halted, joined by ``+``); ``last``: the latest report.
        n_checked, n_flagged: counts.
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
    ):
        self.thresholds = thresholds
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

    def resume(self, history: list[dict]) -> None:
        """Continue the counts of an earlier session (a restart) from its history lines."""
        self.history = list(history)
        self.n_checked = len(self.history)
        self.n_flagged = sum(r["level"] >= 1 for r in self.history)

    def check(
        self,
        atoms: Atoms,
        stats: Mapping[str, np.ndarray],
        *,
        step: int,
        time_fs: float,
        temperature_K: float,
        map_bad: Sequence[str] = (),
    ) -> FrameReport:
        """The verdict on ``atoms`` at ``step``, recorded, exported and (level 2) halting.

        Args:
            atoms: the configuration (copied where it is kept).
            stats: its Monte Carlo statistics (``energy`` eV, ``forces (n, 3)`` eV/A,
                ``energy_variance`` eV^2, ``forces_variance (n,)`` eV^2/A^2, optional stress).
            step, time_fs: where the trajectory is.
            temperature_K: the instantaneous temperature, K.
            map_bad: keys of the MAP prediction (which moves the atoms) that are not finite.
        """
        report = evaluate_frame(stats, atoms, self.thresholds)
        if map_bad and report.level < 2:  # the MAP forces that drive the dynamics are unusable
            report = with_halt(report, [("non_finite", "non-finite prediction: MAP " + ", ".join(map_bad))])
        if self.physics is not None:
            energy = float(stats["energy"]) + 1.5 * len(atoms) * units.kB * temperature_K
            report = with_halt(report, self.physics.check(atoms, energy_eV=energy, temperature_K=temperature_K))
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
        }
        self.history.append(record)
        self.n_checked += 1
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

    def rearm(self) -> None:
        """Start the physical checks afresh (a respawned walker); the last halt stays recorded."""
        self.halted = False
        if self.physics is not None:
            self.physics.reset()

    def summary(self) -> dict:
        """Counts, the halt and the force-std statistics over finite values (NaN frames halt)."""
        stds = [r["max_force_std"] for r in self.history if np.isfinite(r["max_force_std"])]
        return {
            "n_checked": self.n_checked,
            "n_flagged": self.n_flagged,
            "halted": self.halted,
            "halt_step": self.halt_step,
            "stop_reason": self.stop_reason,
            "stop_check": self.stop_check,
            "max_force_std_max": max(stds) if stds else None,
            "max_force_std_mean": float(np.mean(stds)) if stds else None,
        }
