"""Uncertainty monitor for ASE dynamics: Monte Carlo uncertainty every k steps, flag or halt.

The policy (thresholds, metrics, physical checks) is :mod:`blip_ase.md.policy` and
:mod:`blip_ase.md.physics`; recording, export and halting are the :class:`~blip_ase.md.tracker.Tracker`
that the batched walkers use too. This module attaches them to ASE dynamics.

Usage::

    atoms.calc = BLIPCalculator.from_checkpoint("model.pt", mode="map", n_samples=16)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs, fixcm=False)
    monitor = UncertaintyMonitor(dyn, thresholds=Thresholds(force_std_flag=0.2, force_std_halt=1.0))
    dyn.attach(monitor, interval=10)
    dyn.run(1000)
    if monitor.triggered:
        print(monitor.stop_reason)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ase import Atoms, units

from blip_ase.md.physics import PhysicalChecks
from blip_ase.md.policy import (  # re-exported: the public names of the policy lived here
    LEVELS,
    PREDICTION_KEYS,
    FrameReport,
    Thresholds,
    evaluate_frame,
    non_finite_keys,
    resolve_for_calculator,
)
from blip_ase.md.schedule import CheckSchedule
from blip_ase.md.tracker import Tracker
from blip_ase.md.writers import FrameWriter, HistoryCSV

DEFAULT_CHECKS = PhysicalChecks()

__all__ = [
    "LEVELS",
    "PREDICTION_KEYS",
    "FrameReport",
    "Thresholds",
    "UncertaintyMonitor",
    "evaluate_frame",
    "non_finite_keys",
]


class UncertaintyMonitor:
    """Observer for ASE dynamics: ``dyn.attach(monitor, interval=k)``.

    Each call evaluates ``atoms.calc.monte_carlo(atoms, n_samples)`` for the current frame (a
    :class:`~blip_ase.calculator.BLIPCalculator`, typically in ``mode="map"`` so that MAP forces
    propagate the dynamics) and hands it to its :class:`~blip_ase.md.tracker.Tracker`: the
    history is recorded, frames above ``flag`` go to every writer, and the first frame above
    ``halt`` or failing a physical check stops the dynamics (``dyn.max_steps`` is set to the
    current step, so ``run()`` returns right after this step's observers).

    Args:
        dyn: the ASE dynamics (for ``nsteps``, ``get_time()``, ``atoms`` and stopping).
        thresholds: the policy; calibrated force-std thresholds are resolved to eV/A here against
            the calculator's ``reference`` (:meth:`~blip_ase.md.policy.Thresholds.resolve`).
        writers: flagged-frame writers (:class:`~blip_ase.md.writers.ExtXYZFrameWriter`, ...).
        history_file: optional CSV receiving one line per checked frame.
        n_samples: Monte Carlo samples per check (None = the calculator's ``n_samples``).
        atoms: the atoms carrying the calculator (default ``dyn.atoms``, unwrapping a filter).
        on_check: called as ``on_check(monitor, report)`` after each check (progress bars).
        physical: the physical checks (:class:`~blip_ase.md.physics.PhysicalChecks`, on by
            default; None: off). The bond graph of ``atoms`` now is the reference, the model's
            ``cutoff`` the isolated-atom distance.
        temperature_K: the target of the temperature-runaway check, K (None: the thermostat's
            ``temp`` of ``dyn`` if it has one).
        reference: the structure whose bond graph the fragmentation check compares with
            (None: ``atoms`` as they are now).
        screen: let the model's uncertainty screen (``calc.engine.screen``, fitted by
            ``blip calibrate``) clear a check without samples when its bound on every atom's
            force std is below the atom's flag threshold (:meth:`Tracker.screen
            <blip_ase.md.tracker.Tracker.screen>`); no effect for a model without a screen.
        screen_anchor_steps: see :class:`~blip_ase.md.MDConfig`.
        schedule: the monitor's own :class:`~blip_ase.md.schedule.CheckSchedule` (adaptive
            intervals; ``MDConfig.schedule()``); attach it with ``interval=1`` and it checks the
            steps that are due. None (default): every call is a check, as the attach interval says.

    Attributes:
        tracker: the trajectory's :class:`~blip_ase.md.tracker.Tracker`; ``history``,
            ``triggered``, ``stop_reason``, ``halt_step``, ``last``, ``n_checked`` and
            ``n_flagged`` read from it.
        uq_seconds: wall time spent in uncertainty checks (screen and Monte Carlo).
    """

    def __init__(
        self,
        dyn,
        *,
        thresholds: Thresholds = Thresholds(),
        writers: Sequence[FrameWriter] = (),
        history_file: HistoryCSV | None = None,
        n_samples: int | None = None,
        atoms: Atoms | None = None,
        on_check: Callable[[UncertaintyMonitor, FrameReport], None] | None = None,
        physical: PhysicalChecks | None = DEFAULT_CHECKS,
        temperature_K: float | None = None,
        reference: Atoms | None = None,
        screen: bool = True,
        screen_anchor_steps: int = 0,
        schedule: CheckSchedule | None = None,
    ):
        self.dyn = dyn
        self.screen = screen
        self.n_samples = n_samples
        self.atoms = atoms if atoms is not None else getattr(dyn.atoms, "atoms", dyn.atoms)
        self.thresholds = thresholds = resolve_for_calculator(thresholds, self.atoms.calc)  # calibrated -> eV/A
        self.on_check = on_check
        if temperature_K is None and getattr(dyn, "temp", None) is not None:
            temperature_K = float(dyn.temp) / units.kB
        model = getattr(self.atoms.calc, "model", None)
        self.tracker = Tracker(
            thresholds,
            physical=physical,
            reference=self.atoms.copy() if reference is None else reference,
            cutoff_A=getattr(model, "cutoff", None),
            target_K=temperature_K,
            writers=writers,
            history_file=history_file,
            anchor_steps=screen_anchor_steps,
            schedule=schedule,
        )
        self.uq_seconds = 0.0

    writers = property(lambda self: self.tracker.writers)
    history = property(lambda self: self.tracker.history)
    triggered = property(lambda self: self.tracker.halted)
    stop_reason = property(lambda self: self.tracker.stop_reason)
    halt_step = property(lambda self: self.tracker.halt_step)
    last = property(lambda self: self.tracker.last)
    n_checked = property(lambda self: self.tracker.n_checked)
    n_flagged = property(lambda self: self.tracker.n_flagged)

    def __call__(self) -> None:
        if self.tracker.due(int(self.dyn.nsteps)):
            self.check()

    def check(self) -> None:
        """Check the current frame now (whether or not the schedule says it is due)."""
        atoms = self.atoms
        calc = atoms.calc
        if not hasattr(calc, "monte_carlo"):
            raise TypeError(
                f"UncertaintyMonitor needs a calculator with monte_carlo() (BLIPCalculator), got {type(calc).__name__}"
            )
        map_bad = self._non_finite_results()
        step, time_fs = int(self.dyn.nsteps), round(float(self.dyn.get_time() / units.fs), 9)
        where = {"step": step, "time_fs": time_fs, "temperature_K": float(atoms.get_temperature())}
        start = time.perf_counter()
        report = physical = None
        if self.screen and not map_bad and getattr(getattr(calc, "engine", None), "screen", None) is not None:
            report = self._screen(atoms, where)
            physical, report = (report, None) if isinstance(report, list) else (None, report)
        if report is None:
            stats = calc.monte_carlo(atoms, n_samples=self.n_samples)
            report = self.tracker.check(atoms, stats, map_bad=map_bad, physical=physical, **where)
        self.uq_seconds += time.perf_counter() - start
        if report.level == 2:
            self.dyn.max_steps = self.dyn.nsteps
        if self.on_check is not None:
            self.on_check(self, report)

    def _screen(self, atoms: Atoms, where: dict):
        """The screen's verdict on this frame (:meth:`~blip_ase.md.tracker.Tracker.screen`), from the
        calculator's MAP results of it when they are current."""
        calc = atoms.calc
        engine = calc.engine
        results = calc.results if calc.atoms is not None and not calc.check_state(atoms) else {}
        prepared = engine.prepare(atoms)
        if "forces" not in results or "energy" not in results:
            results = engine.map(prepared, stress=False)[0]
        bound = engine.screen_bound(prepared, forces=results["forces"])[0]
        return self.tracker.screen(atoms, energy_eV=float(results["energy"]), bound=bound, **where)

    def check_finite(self) -> None:
        """Every-step observer: a non-finite energy, force or stress in the calculator's results
        (the MAP forces that move the atoms) triggers a check of this step at once, which halts.

        Attach it with ``dyn.attach(monitor.check_finite, interval=1)`` after the monitor itself;
        without it a NaN between two checks is propagated into the positions and the next step
        fails with a misleading error. It costs a comparison of the cached results per step.
        """
        step = int(self.dyn.nsteps)
        if self.triggered or (self.history and self.history[-1]["step"] == step):
            return
        if self._non_finite_results():
            self.check()

    def _non_finite_results(self) -> list[str]:
        """Keys of the calculator's current results (this configuration) that are not finite."""
        calc = self.atoms.calc
        results = getattr(calc, "results", None)
        if not results or calc.atoms is None or calc.check_state(self.atoms):
            return []
        return non_finite_keys({k: results[k] for k in ("energy", "forces", "stress") if k in results})

    def summary(self) -> dict:
        """Counts, thresholds, stop reason and Monte Carlo timing, JSON-serialisable."""
        return {
            **self.tracker.summary(),
            "thresholds": self.thresholds.to_dict(),
            "uq_seconds": self.uq_seconds,
            "exports": [str(w.path) for w in self.writers],
        }
