"""The uncertainty-monitored MD run behind ``blip md``: :func:`run_md`.

MAP forces propagate the dynamics, the Monte Carlo uncertainty and the physical checks are
evaluated every ``uq_interval`` steps by an :class:`~blip_ase.md.monitor.UncertaintyMonitor`
(and a non-finite force halts at any step), and everything is written to one directory:

- ``md.traj``: ASE trajectory every ``traj_interval`` steps and the last frame (restart point);
- ``md.log``: ASE's MD log (time, energies, temperature) every ``traj_interval`` steps;
- ``flagged.extxyz`` and ``flagged.h5``: frames above the flag threshold (see writers);
- ``uncertainty.csv``: the monitor's history (``check``: what set a frame's level);
  ``uncertainty.png``: its plot;
- ``summary.json``: counts, thresholds, stop reason and check (``stop_check``), timings and the
  run's configuration with the physical checks (the restart reads it), rewritten during the run;
  strict JSON. ``thresholds`` holds the thresholds in eV/A the run applied (calibrated ones
  resolved per element against the model's calibration reference), ``config.thresholds`` the
  thresholds as given (a restart resolves them again against the same model). The lifecycle
  (interrupt, failure, summary, plot) is :mod:`blip_ase.md.lifecycle`.

Every input is checked before anything is created: the model, the structure (elements the
model knows, finite positions), the thresholds (per-element ones for elements the model
knows), the ensemble against structure and model, and the output directory.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms

from blip_ase import interrupts
from blip_ase.md.config import MDConfig
from blip_ase.md.dynamics import DYNAMICS_KEYS, make_dynamics, thermalize
from blip_ase.md.inputs import check_inputs, load_calculator, read_structure, structure_path
from blip_ase.md.lifecycle import Interrupted, MDRunFailed, RunLifecycle, check_output, prepare_output
from blip_ase.md.monitor import FrameReport, UncertaintyMonitor
from blip_ase.md.policy import resolve_for_calculator
from blip_ase.md.restart import read_stored_config, restart_config
from blip_ase.md.writers import (
    ExtXYZFrameWriter,
    HDF5FrameWriter,
    HistoryCSV,
    TrajectoryObserver,
    plot_history,
    read_history,
    read_restart,
)

if TYPE_CHECKING:
    from ase.md.md import MolecularDynamics

__all__ = ["OUTPUT_FILES", "Interrupted", "MDRunFailed", "read_structure", "run_md"]

OUTPUT_FILES = (
    "md.traj",
    "md.log",
    "flagged.extxyz",
    "flagged.h5",
    "uncertainty.csv",
    "uncertainty.png",
    "summary.json",
)
APPENDABLE = {"flagged.extxyz": ExtXYZFrameWriter, "flagged.h5": HDF5FrameWriter, "uncertainty.csv": HistoryCSV}


class Progress:
    """The progress bar of :func:`run_md` (None-safe: nothing without ``config.progress``)."""

    def __init__(self, config: MDConfig, start_step: int):
        self.pbar = None
        if config.progress:
            from tqdm import tqdm

            self.pbar = tqdm(total=config.steps, initial=start_step, unit="step", dynamic_ncols=True)

    def show(self, temperature_K: float, report: FrameReport) -> None:
        if self.pbar is not None:
            text = f"T={temperature_K:.0f} K, max F std={report.max_force_std:.3f} eV/A"
            self.pbar.set_postfix_str(text, refresh=False)

    def advance(self, step: int) -> None:
        if self.pbar is not None:
            self.pbar.update(step - self.pbar.n)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()


def run_md(config: MDConfig, *, given: Collection[str] | None = None) -> dict:
    """Run uncertainty-monitored MD as configured; returns the final ``summary.json`` content.

    Everything that can be checked is checked before anything is created (see the module
    docstring). A halt stops the run cleanly at the first checked frame above the halt threshold,
    failing a physical check, or with a non-finite prediction (``status: "halted"``); Ctrl-C or
    :class:`~blip_ase.md.lifecycle.Interrupted` stops it with ``status: "interrupted"`` and the
    signal recorded; all still write the summary and plot.

    Args:
        config: the run. With ``restart`` the configuration stored in ``out/summary.json`` is
            used; ``config`` may change only the fields of
            :data:`blip_ase.md.restart.CHANGEABLE_ON_RESTART`.
        given: on restart, the fields the caller set explicitly (``blip md`` passes the options
            on its command line); None = the fields that differ from :class:`MDConfig`'s defaults.

    Raises:
        FileExistsError, FileNotFoundError, ValueError: bad input, with a message naming it.
        MDRunFailed: the dynamics raised after the start (``summary.json`` says ``failed``).
    """
    if config.restart:
        check_output(config)
        config = restart_config(config, read_stored_config(Path(config.out)), given)
    calc, path = load_calculator(config)
    if config.restart:
        atoms, start = read_restart(Path(config.out))
        source = f"{Path(config.out) / 'md.traj'} (last frame)"
    else:
        source, start = structure_path(config), 0
        atoms = read_structure(source)
    atoms.calc = calc
    check_inputs(atoms, calc.model, config, source=source)
    thresholds = resolve_for_calculator(config.thresholds, calc, source=str(path))  # calibrated -> eV/A
    check_output(config)
    reference = reference_structure(config, atoms)
    rng = np.random.default_rng(config.seed)
    if start == 0:
        T0 = config.temperature_K if config.init_temperature_K is None else config.init_temperature_K
        thermalize(atoms, T0, rng=rng)
    else:  # a restart continues with fresh streams, not a replay of those from step 0
        stream = np.random.SeedSequence([config.seed, start])
        rng = np.random.default_rng(stream)
        calc.generator.manual_seed(int(stream.generate_state(1, dtype=np.uint64)[0] >> 1))
    dyn = make_dynamics(atoms, config.ensemble, **{k: getattr(config, k) for k in DYNAMICS_KEYS}, rng=rng)
    dyn.nsteps = start
    out = prepare_output(config, OUTPUT_FILES)  # the first thing created
    if config.restart:
        for name, cls in APPENDABLE.items():  # later steps are re-run: drop what they wrote
            if (out / name).exists():
                cls(out / name, append=True).truncate_after(start)
    info = run_info(config, path, source, atoms, start)  # config.thresholds as given: a restart re-resolves
    return execute(replace(config, thresholds=thresholds), out, info, dyn, atoms, reference)


def reference_structure(config: MDConfig, atoms: Atoms) -> Atoms:
    """The structure whose bond graph the fragmentation check compares with: the run's start
    structure (also on restart, where it is read back if it still exists), else ``atoms``."""
    if config.restart and config.structure is not None:
        try:
            return read_structure(config.structure)
        except (OSError, ValueError):
            pass
    return atoms.copy()


def run_info(config: MDConfig, path: Path, source: str, atoms: Atoms, start: int) -> dict:
    """The summary's description of the run; ``config`` is what a restart reads back."""
    stored = config.to_dict()
    stored.update(model=str(path.resolve()), restart=False, overwrite=False, progress=False)
    if not config.restart:
        stored["structure"] = str(Path(source).resolve()) if Path(source).exists() else source
    return {
        "model": str(path),
        "structure": source,
        "formula": atoms.get_chemical_formula(),
        "n_atoms": len(atoms),
        "start_step": start,
        "steps_requested": config.steps,
        "config": stored,
        "outputs": {name: str(Path(config.out) / name) for name in OUTPUT_FILES},
    }


def execute(
    config: MDConfig, out: Path, info: dict, dyn: MolecularDynamics, atoms: Atoms, reference: Atoms
) -> dict:
    """Attach the observers, run the dynamics through the lifecycle, write summary and plot
    (``config.thresholds`` in eV/A: resolved already)."""
    from ase.md.logger import MDLogger

    append, start = config.restart, int(info["start_step"])
    traj = TrajectoryObserver(dyn, atoms, out / "md.traj", append=append)
    dyn.attach(traj, interval=config.traj_interval)
    logger = MDLogger(dyn, atoms, str(out / "md.log"), header=not append, mode="a" if append else "w")
    dyn.attach(logger, interval=config.traj_interval)
    progress = Progress(config, start)
    monitor = UncertaintyMonitor(
        dyn,
        thresholds=config.thresholds,
        writers=[
            ExtXYZFrameWriter(out / "flagged.extxyz", append=append),
            HDF5FrameWriter(out / "flagged.h5", append=append),
        ],
        history_file=HistoryCSV(out / "uncertainty.csv", append=append),
        n_samples=config.n_samples,
        on_check=lambda m, report: on_check(m, report),
        physical=config.physical,
        temperature_K=config.temperature_K,
        reference=reference,
        screen=config.screen,
        screen_anchor_steps=config.screen_anchor_steps,
        schedule=config.schedule(),
    )
    dyn.attach(monitor, interval=1)  # it checks the steps its schedule says are due
    dyn.attach(monitor.check_finite, interval=1)  # a NaN force halts at once, not at the next check
    if append:  # counts and history cover the whole run; timings cover this session
        monitor.tracker.resume(read_history(out / "uncertainty.csv"))
    life = RunLifecycle(
        out, info, state=lambda wall: run_state(monitor, dyn, start, wall), step=lambda: int(dyn.nsteps),
        summary_every_s=config.summary_every_s,
    )  # fmt: skip
    life.tick(now=True)

    def on_check(monitor: UncertaintyMonitor, report: FrameReport) -> None:
        progress.show(monitor.history[-1]["temperature_K"], report)
        life.tick(now=report.level > 0)

    def loop() -> None:
        for _ in dyn.irun(max(config.steps - start, 0)):
            interrupts.raise_pending()  # a signal whose exception Python swallowed (blip_ase.interrupts)
            progress.advance(int(dyn.nsteps))

    def cleanup() -> None:
        progress.close()
        traj()  # the last frame is always the restart point
        traj.close()
        logger.close()

    status = life.run(loop, cleanup=cleanup)
    if status == "completed" and monitor.triggered:
        status = "halted"
    title = f"{info['formula']} {config.ensemble} {config.temperature_K:g} K"
    plot = (lambda png, summary: plot_run(png, out, config, f"{title} ({summary['status']})")) if config.plot else None
    return life.finish(status, plot)


def plot_run(png: Path, out: Path, config: MDConfig, title: str) -> None:
    t = config.thresholds
    plot_history(png, read_history(out / "uncertainty.csv"), flag=t.force_std_flag, halt=t.force_std_halt, title=title,
                 per_element=t.per_element)


def run_state(monitor: UncertaintyMonitor, dyn: MolecularDynamics, start: int, wall: float) -> dict:
    """The live fields of the summary: steps, the tracker's counts and halt, timings."""
    steps_done = int(dyn.nsteps) - start
    mon = monitor.summary()
    uq = mon["uq_seconds"]
    return {
        "final_step": start + steps_done,
        "steps_done": steps_done,
        **mon,
        "timings": {
            "wall_seconds": wall,
            "uq_seconds": uq,
            "md_seconds": wall - uq,
            "ms_per_step": 1e3 * wall / steps_done if steps_done else None,
        },
    }
