"""The uncertainty-monitored MD run behind ``blip md``: :func:`run_md`.

MAP forces propagate the dynamics, the Monte Carlo uncertainty is evaluated every
``uq_interval`` steps by an :class:`~blip_ase.md.monitor.UncertaintyMonitor` (and a non-finite
force halts at any step), and everything is written to one directory:

- ``md.traj``: ASE trajectory every ``traj_interval`` steps and the last frame (restart point);
- ``md.log``: ASE's MD log (time, energies, temperature) every ``traj_interval`` steps;
- ``flagged.extxyz`` and ``flagged.h5``: frames above the flag threshold (see writers);
- ``uncertainty.csv``: the monitor's history; ``uncertainty.png``: its plot;
- ``summary.json``: counts, thresholds, stop reason, timings and the run's configuration (the
  restart reads it), rewritten during the run; strict JSON.

Every input is checked before anything is created: the model, the structure (elements the
model knows, finite positions), the thresholds (per-element ones for elements the model
knows), the ensemble against structure and model, and the output directory.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from blip_ase.md.config import MDConfig
from blip_ase.md.dynamics import DYNAMICS_KEYS, check_ensemble, make_dynamics, thermalize
from blip_ase.md.monitor import FrameReport, UncertaintyMonitor
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
from blip_ase.strict_json import write_json

if TYPE_CHECKING:
    from ase.md.md import MolecularDynamics

OUTPUT_FILES = (
    "md.traj",
    "md.log",
    "flagged.extxyz",
    "flagged.h5",
    "uncertainty.csv",
    "uncertainty.png",
    "summary.json",
)
_APPENDABLE = {"flagged.extxyz": ExtXYZFrameWriter, "flagged.h5": HDF5FrameWriter, "uncertainty.csv": HistoryCSV}


def check_output(config: MDConfig, *, restartable: bool = True) -> Path:
    """The output directory, checked (nothing is created here); ``restartable=False`` for runs that
    cannot be restarted (batched walkers), whose message then offers ``--overwrite`` only.

    Raises:
        FileExistsError: ``out`` holds files and neither ``overwrite`` nor ``restart`` is set, or
            is a file.
        FileNotFoundError: ``restart`` without a trajectory to restart from.
    """
    out = Path(config.out)
    if config.restart:
        if not (out / "md.traj").is_file():
            raise FileNotFoundError(f"cannot restart: {out / 'md.traj'} does not exist")
        return out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(
            f"output directory {out} already exists; pass --overwrite{' or --restart' if restartable else ''}"
        )
    return out


def prepare_output(config: MDConfig, *, restartable: bool = True) -> Path:
    """Create the output directory (clearing an earlier run's files with ``overwrite``).

    Raises:
        FileExistsError, FileNotFoundError: as :func:`check_output`.
    """
    out = check_output(config, restartable=restartable)
    if not config.restart:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    return out


def model_path(config: MDConfig) -> Path:
    """The checkpoint of the run: ``config.model`` or the shipped ammonia model."""
    from blip_ase.assets import ammonia_model

    return ammonia_model() if config.model is None else Path(config.model)


def structure_path(config: MDConfig) -> str:
    """The starting structure of the run (``FILE`` or ``FILE@INDEX``): ``config.structure`` or the shipped NH3."""
    from blip_ase.assets import ammonia_structure

    return str(ammonia_structure()) if config.structure is None else str(config.structure)


def read_structure(spec: str | Path) -> Atoms:
    """One frame of a structure file: ``FILE`` (first frame) or ``FILE@INDEX`` (e.g. ``md.traj@-1``).

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, no atoms, or several frames picked;
            the file is named.
    """
    path, index, frames = read_frames(spec, default_index="0")
    if len(frames) != 1:
        raise ValueError(f"{spec} picks {len(frames)} frames of {path}; one start structure is needed")
    return frames[0]


def read_frames(spec: str | Path, *, default_index: str = ":") -> tuple[Path, str, list[Atoms]]:
    """The frames ``FILE@INDEX`` picks (``INDEX`` as ``ase.io.read`` takes it: ``-1``, ``0:4``, ``:``),
    or ``default_index`` of ``FILE``; returns the path, the index and the frames.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, or no atoms; the file is named.
    """
    from ase.io import read

    path, index = Path(spec), default_index
    name, _, tail = str(spec).rpartition("@")
    if name and not path.exists():
        path, index = Path(name), tail
    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} does not exist")
    try:
        frames = read(path, index=index)
    except Exception as exc:  # ase.io raises many types for unreadable files
        raise ValueError(f"cannot read structure file {path} (frames {index!r}): {type(exc).__name__}: {exc}") from exc
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if not frames or any(not isinstance(a, Atoms) or len(a) == 0 for a in frames):
        raise ValueError(f"structure file {path} holds no atoms (frames {index!r})")
    return path, index, frames


def check_inputs(atoms: Atoms, model, config: MDConfig, *, source: str) -> None:
    """Raise ``ValueError`` for a run that cannot work, before anything is created.

    Args:
        atoms: the starting structure, carrying the run's calculator.
        model: the run's :class:`~blip_ase.models.potential.Potential` (for its elements).
        config: the run.
        source: where ``atoms`` came from, named in the messages.
    """
    from blip_ase.data.graph import species_index, validate_atoms

    try:
        validate_atoms(atoms)
        species_index(atoms.numbers, list(model.elements))
    except ValueError as exc:
        raise ValueError(f"structure {source}: {exc}") from None
    known = [chemical_symbols[z] for z in model.elements]
    unknown = sorted(set(config.thresholds.per_element) - set(known))
    if unknown:
        raise ValueError(f"per-element threshold (--element-threshold) for {unknown}: the model knows only {known}")
    check_ensemble(atoms, config.ensemble)


def _load_calculator(config: MDConfig):
    from blip_ase.calculator import BLIPCalculator

    path = model_path(config)
    calc = BLIPCalculator.from_checkpoint(
        path, mode="map", n_samples=config.n_samples, seed=config.seed, device=config.device
    )
    if not calc.model.has_uncertainty:
        raise ValueError(
            f"{path} is a deterministic model: uncertainty-monitored MD needs a BLIP model (or LLPR data: blip llpr)"
        )
    return calc, path


class Interrupted(KeyboardInterrupt):
    """Raised by a signal handler to stop :func:`run_md` cleanly; ``signum`` is recorded."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class MDRunFailed(RuntimeError):
    """The dynamics raised after the run had started; ``summary.json`` says ``failed``."""


class _Run:
    """Bookkeeping of one :func:`run_md` call: summary rewrites and the progress bar."""

    def __init__(self, config: MDConfig, out: Path, info: dict):
        self.config, self.out, self.info = config, out, info
        self.start = time.perf_counter()
        self.last_write = -np.inf
        self.monitor: UncertaintyMonitor | None = None
        self.dyn: MolecularDynamics | None = None
        self.start_step = int(info["start_step"])
        self.pbar = None
        if config.progress:
            from tqdm import tqdm

            self.pbar = tqdm(total=config.steps, initial=self.start_step, unit="step", dynamic_ncols=True)

    def on_check(self, monitor: UncertaintyMonitor, report: FrameReport) -> None:
        if self.pbar is not None:
            T = monitor.history[-1]["temperature_K"]
            self.pbar.set_postfix_str(f"T={T:.0f} K, max F std={report.max_force_std:.3f} eV/A", refresh=False)
        now = time.perf_counter()
        if report.level or now - self.last_write >= self.config.summary_every_s:
            self.write_summary("running")
            self.last_write = now

    def advance(self) -> None:
        if self.pbar is not None:
            self.pbar.update(self.dyn.nsteps - self.pbar.n)

    def write_summary(self, status: str) -> dict:
        wall = time.perf_counter() - self.start
        steps_done = int(self.dyn.nsteps) - self.start_step if self.dyn is not None else 0
        mon = self.monitor.summary() if self.monitor is not None else {}
        uq = mon.get("uq_seconds", 0.0)
        summary = {
            "status": status,
            **self.info,
            "final_step": self.start_step + steps_done,
            "steps_done": steps_done,
            **mon,
            "timings": {
                "wall_seconds": wall,
                "uq_seconds": uq,
                "md_seconds": wall - uq,
                "ms_per_step": 1e3 * wall / steps_done if steps_done else None,
            },
        }
        write_json(self.out / "summary.json", summary)
        return summary

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()


def run_md(config: MDConfig, *, given: Collection[str] | None = None) -> dict:
    """Run uncertainty-monitored MD as configured; returns the final ``summary.json`` content.

    Everything that can be checked is checked before anything is created (see the module
    docstring). A halt stops the run cleanly at the first checked frame above the halt threshold
    or at a non-finite prediction (``status: "halted"``); Ctrl-C or :class:`Interrupted` stops it
    with ``status: "interrupted"`` and the signal recorded; all still write the summary and plot.

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
    calc, path = _load_calculator(config)
    if config.restart:
        atoms, start = read_restart(Path(config.out))
        source = f"{Path(config.out) / 'md.traj'} (last frame)"
    else:
        source, start = structure_path(config), 0
        atoms = read_structure(source)
    atoms.calc = calc
    check_inputs(atoms, calc.model, config, source=source)
    check_output(config)
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
    out = prepare_output(config)  # the first thing created
    if config.restart:
        for name, cls in _APPENDABLE.items():  # later steps are re-run: drop what they wrote
            if (out / name).exists():
                cls(out / name, append=True).truncate_after(start)
    run = _Run(config, out, _run_info(config, path, source, atoms, start))
    run.dyn = dyn
    return _execute(config, out, run, dyn, atoms)


def _run_info(config: MDConfig, path: Path, source: str, atoms: Atoms, start: int) -> dict:
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


def _execute(config: MDConfig, out: Path, run: _Run, dyn: MolecularDynamics, atoms: Atoms) -> dict:
    from ase.md.logger import MDLogger

    append = config.restart
    traj = TrajectoryObserver(dyn, atoms, out / "md.traj", append=append)
    dyn.attach(traj, interval=config.traj_interval)
    logger = MDLogger(dyn, atoms, str(out / "md.log"), header=not append, mode="a" if append else "w")
    dyn.attach(logger, interval=config.traj_interval)
    writers = [
        ExtXYZFrameWriter(out / "flagged.extxyz", append=append),
        HDF5FrameWriter(out / "flagged.h5", append=append),
    ]
    monitor = UncertaintyMonitor(
        dyn,
        thresholds=config.thresholds,
        writers=writers,
        history_file=HistoryCSV(out / "uncertainty.csv", append=append),
        n_samples=config.n_samples,
        on_check=run.on_check,
    )
    dyn.attach(monitor, interval=config.uq_interval)
    dyn.attach(monitor.check_finite, interval=1)  # a NaN force halts at once, not at the next check
    if append:  # counts and history cover the whole run; timings cover this session
        monitor.history = read_history(out / "uncertainty.csv")
        monitor.n_checked = len(monitor.history)
        monitor.n_flagged = sum(r["level"] >= 1 for r in monitor.history)
    run.monitor = monitor
    run.write_summary("running")
    status, interrupted_by = "completed", None
    try:
        for _ in dyn.irun(max(config.steps - run.start_step, 0)):
            run.advance()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the CLI's handler (Interrupted)
        status, interrupted_by = "interrupted", signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
    except Exception as exc:  # e.g. an exploding system: keep a truthful summary, then report it
        run.info["error"] = f"{type(exc).__name__}: {exc}"
        run.write_summary("failed")
        raise MDRunFailed(
            f"the run failed at step {int(dyn.nsteps)}: {type(exc).__name__}: {exc} (summary in {out / 'summary.json'})"
        ) from exc
    finally:
        run.close()
        traj()  # the last frame is always the restart point
        traj.close()
        logger.close()
    if monitor.triggered:
        status = "halted"
    if interrupted_by is not None:
        run.info["signal"] = interrupted_by
        monitor.stop_reason = f"step {int(dyn.nsteps)}: interrupted by {interrupted_by}"
    summary = run.write_summary(status)
    if config.plot:
        history = read_history(out / "uncertainty.csv")
        title = f"{summary['formula']} {config.ensemble} {config.temperature_K:g} K ({status})"
        t = config.thresholds
        plot_history(out / "uncertainty.png", history, flag=t.force_std_flag, halt=t.force_std_halt, title=title)
    return summary
