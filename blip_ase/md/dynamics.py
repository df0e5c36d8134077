"""Dynamics factory (NVE, NVT, NPT from ASE >= 3.29) and the uncertainty-monitored MD run.

:func:`make_dynamics` builds an ASE integrator from unit-named arguments; :func:`run_md` is
what ``blip md`` and ``md_scripts/run_md.py`` call: MAP forces propagate the dynamics, the
Monte Carlo uncertainty is evaluated every ``uq_interval`` steps by an
:class:`~blip_ase.md.monitor.UncertaintyMonitor`, and everything is written to one directory:

- ``md.traj``: ASE trajectory every ``traj_interval`` steps and the last frame (restart point);
- ``md.log``: ASE's MD log (time, energies, temperature) every ``traj_interval`` steps;
- ``flagged.extxyz`` and ``flagged.h5``: frames above the flag threshold (see writers);
- ``uncertainty.csv``: the monitor's history; ``uncertainty.png``: its plot;
- ``summary.json``: counts, thresholds, stop reason and timings (rewritten during the run).
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from ase import Atoms, units

from blip_ase.md.monitor import FrameReport, Thresholds, UncertaintyMonitor
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

Ensemble = Literal[
    "nve", "nvt-langevin", "nvt-bussi", "nvt-nose-hoover", "npt-mtk-isotropic", "npt-mtk", "npt-berendsen"
]
ENSEMBLES: tuple[str, ...] = Ensemble.__args__
NPT_ENSEMBLES = ("npt-mtk-isotropic", "npt-mtk", "npt-berendsen")
OUTPUT_FILES = (
    "md.traj",
    "md.log",
    "flagged.extxyz",
    "flagged.h5",
    "uncertainty.csv",
    "uncertainty.png",
    "summary.json",
)
if TYPE_CHECKING:
    from ase.md.md import MolecularDynamics

REPO_ROOT = Path(__file__).resolve().parents[2]
_APPENDABLE = {"flagged.extxyz": ExtXYZFrameWriter, "flagged.h5": HDF5FrameWriter, "uncertainty.csv": HistoryCSV}


def resolve_path(path: str | Path) -> Path:
    """``path`` if it exists, else the same relative path under the repository/package root."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def check_ensemble(atoms: Atoms, ensemble: str) -> None:
    """Raise ``ValueError`` before a run that cannot work.

    NPT needs a cell periodic in all three directions with non-zero volume and a calculator
    (and model) that computes stress.
    """
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")
    if ensemble not in NPT_ENSEMBLES:
        return
    if not atoms.pbc.all() or abs(atoms.cell.volume) < 1e-9:
        raise ValueError(
            f"{ensemble} needs a periodic cell (pbc all True, non-zero volume); this structure has "
            f"pbc={atoms.pbc.tolist()}: use an NVE/NVT ensemble for molecules"
        )
    calc = atoms.calc
    model = getattr(calc, "model", None)
    if calc is None or "stress" not in calc.implemented_properties or not getattr(model, "implements_stress", True):
        name = type(model or calc).__name__
        raise ValueError(f"{ensemble} needs stress, but the model ({name}) does not compute stress")


def make_dynamics(
    atoms: Atoms,
    ensemble: Ensemble = "nvt-langevin",
    *,
    timestep_fs: float = 0.5,
    temperature_K: float = 300.0,
    pressure_bar: float = 1.0,
    friction_per_fs: float = 0.01,
    tdamp_fs: float = 50.0,
    pdamp_fs: float = 500.0,
    compressibility_per_bar: float = 4.57e-5,
    rng: np.random.Generator | None = None,
) -> MolecularDynamics:
    """An ASE integrator for ``atoms`` (which must carry its calculator).

    Args:
        atoms: the system; NPT needs a periodic cell and a calculator with stress.
        ensemble: ``nve`` (VelocityVerlet), ``nvt-langevin``, ``nvt-bussi``, ``nvt-nose-hoover``
            (NoseHooverChainNVT), ``npt-mtk-isotropic`` (IsotropicMTKNPT), ``npt-mtk`` (MTKNPT,
            anisotropic cell) or ``npt-berendsen`` (NPTBerendsen).
        timestep_fs: time step, fs.
        temperature_K: thermostat target, K.
        pressure_bar: barostat target, bar.
        friction_per_fs: Langevin friction, 1/fs.
        tdamp_fs: thermostat time constant (Bussi, Nose-Hoover chains, MTK, Berendsen), fs.
        pdamp_fs: barostat time constant (MTK, Berendsen), fs.
        compressibility_per_bar: Berendsen compressibility, 1/bar.
        rng: random generator of the stochastic thermostats (Langevin, Bussi).

    Raises:
        ValueError: unknown ensemble, non-positive time constants, or NPT that cannot work.
    """
    check_ensemble(atoms, ensemble)
    for name, value in (("timestep_fs", timestep_fs), ("tdamp_fs", tdamp_fs), ("pdamp_fs", pdamp_fs)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if temperature_K < 0:
        raise ValueError(f"temperature_K must be >= 0, got {temperature_K!r}")
    settings = {
        "dt": timestep_fs * units.fs,
        "T": temperature_K,
        "p": pressure_bar * units.bar,
        "tdamp": tdamp_fs * units.fs,
        "pdamp": pdamp_fs * units.fs,
        "friction": friction_per_fs / units.fs,
        "beta": compressibility_per_bar / units.bar,
        "rng": np.random.default_rng() if rng is None else rng,
    }
    return _construct(atoms, ensemble, **settings)


def _construct(atoms: Atoms, ensemble: str, *, dt, T, p, tdamp, pdamp, friction, beta, rng) -> MolecularDynamics:
    """The ASE integrator of ``ensemble``; arguments in ASE units."""
    from ase.md.bussi import Bussi
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import IsotropicMTKNPT, MTKNPT, NoseHooverChainNVT
    from ase.md.nptberendsen import NPTBerendsen
    from ase.md.verlet import VelocityVerlet

    if ensemble == "nve":
        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt-langevin":  # fixcm=True is deprecated in ASE 3.29 and biases molecules
        return Langevin(atoms, dt, temperature_K=T, friction=friction, fixcm=False, rng=rng)
    if ensemble == "nvt-bussi":
        return Bussi(atoms, dt, temperature_K=T, taut=tdamp, rng=rng)
    if ensemble == "nvt-nose-hoover":
        return NoseHooverChainNVT(atoms, dt, temperature_K=T, tdamp=tdamp)
    if ensemble == "npt-mtk-isotropic":
        return IsotropicMTKNPT(atoms, dt, temperature_K=T, pressure_au=p, tdamp=tdamp, pdamp=pdamp)
    if ensemble == "npt-mtk":
        return MTKNPT(atoms, dt, temperature_K=T, pressure_au=p, tdamp=tdamp, pdamp=pdamp)
    return NPTBerendsen(atoms, dt, temperature_K=T, pressure_au=p, taut=tdamp, taup=pdamp, compressibility_au=beta)


def thermalize(atoms: Atoms, temperature_K: float, *, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_K`` (K), zero total momentum (and, for
    molecules, zero angular momentum). ``atoms`` momenta are overwritten."""
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)


@dataclass(frozen=True)
class MDConfig:
    """Everything :func:`run_md` needs; the ``blip md`` options map one to one onto these fields.

    Attributes:
        model: checkpoint path (a relative path missing from the working directory is looked up
            in the repository, so the shipped ``examples/ammonia/model.pt`` is found anywhere).
        structure: starting structure, any file ``ase.io.read`` understands (first frame).
        out: output directory.
        ensemble: see :func:`make_dynamics`.
        steps: total number of MD steps (on restart: the total including the steps already run).
        timestep_fs, temperature_K, pressure_bar, friction_per_fs, tdamp_fs, pdamp_fs,
            compressibility_per_bar: see :func:`make_dynamics`.
        init_temperature_K: temperature of the initial Maxwell-Boltzmann velocities (None = the
            thermostat's ``temperature_K``).
        seed: seeds the velocities, the stochastic thermostat and the Monte Carlo noise.
        n_samples: Monte Carlo samples per uncertainty check.
        uq_interval: steps between uncertainty checks.
        traj_interval: steps between trajectory/log frames.
        thresholds: flag/halt policy.
        device: torch device (None: CUDA if available, else CPU).
        overwrite: replace the outputs of an earlier run in ``out``.
        restart: continue the run in ``out`` from the last frame of ``md.traj``.
        progress: show a progress bar (stderr).
        plot: write ``uncertainty.png``.
        summary_every_s: minimum seconds between rewrites of ``summary.json`` during the run.
    """

    model: str = "examples/ammonia/model.pt"
    structure: str = "examples/ammonia/nh3.xyz"
    out: str = "md_out"
    ensemble: Ensemble = "nvt-langevin"
    steps: int = 2000
    timestep_fs: float = 0.5
    temperature_K: float = 300.0
    pressure_bar: float = 1.0
    friction_per_fs: float = 0.01
    tdamp_fs: float = 50.0
    pdamp_fs: float = 500.0
    compressibility_per_bar: float = 4.57e-5
    init_temperature_K: float | None = None
    seed: int = 0
    n_samples: int = 16
    uq_interval: int = 10
    traj_interval: int = 10
    thresholds: Thresholds = field(default_factory=Thresholds)
    device: str | None = None
    overwrite: bool = False
    restart: bool = False
    progress: bool = False
    plot: bool = True
    summary_every_s: float = 2.0

    def __post_init__(self):
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"unknown ensemble {self.ensemble!r}; choose one of {', '.join(ENSEMBLES)}")
        for name in ("steps", "n_samples", "uq_interval", "traj_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'steps' else 1}, got {value!r}")
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 (variances need two samples), got {self.n_samples}")
        if self.overwrite and self.restart:
            raise ValueError("overwrite and restart exclude each other")


def prepare_output(config: MDConfig) -> Path:
    """Create the output directory; refuse to clobber an earlier run unless asked.

    Raises:
        FileExistsError: ``out`` holds files and neither ``overwrite`` nor ``restart`` is set.
        FileNotFoundError: ``restart`` without a trajectory to restart from.
    """
    out = Path(config.out)
    if config.restart:
        if not (out / "md.traj").is_file():
            raise FileNotFoundError(f"cannot restart: {out / 'md.traj'} does not exist")
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not config.overwrite:
            raise FileExistsError(f"output directory {out} already exists; pass --overwrite or --restart")
        if not out.is_dir():
            raise FileExistsError(f"output path {out} exists and is not a directory")
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_structure(path: str | Path) -> Atoms:
    """First frame of a structure file; errors name the file."""
    from ase.io import read

    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} does not exist")
    try:
        atoms = read(path, index=0)
    except Exception as exc:  # ase.io raises many types for unreadable files
        raise ValueError(f"cannot read structure file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise ValueError(f"structure file {path} holds no atoms")
    return atoms


def _load_calculator(config: MDConfig):
    from blip_ase.calculator import BLIPCalculator

    model_path = resolve_path(config.model)
    calc = BLIPCalculator.from_checkpoint(
        model_path, mode="map", n_samples=config.n_samples, seed=config.seed, device=config.device
    )
    if not calc.model.is_bayesian:
        raise ValueError(f"{model_path} is a deterministic model: uncertainty-monitored MD needs a BLIP model")
    return calc, model_path


def _initial_state(config: MDConfig, out: Path, rng: np.random.Generator) -> tuple[Atoms, int]:
    if config.restart:
        atoms, start = read_restart(out)
        for name, cls in _APPENDABLE.items():  # later steps are re-run: drop what they wrote
            if (out / name).exists():
                cls(out / name, append=True).truncate_after(start)
        return atoms, start
    atoms = read_structure(config.structure)
    T0 = config.temperature_K if config.init_temperature_K is None else config.init_temperature_K
    thermalize(atoms, T0, rng=rng)
    return atoms, 0


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


def run_md(config: MDConfig) -> dict:
    """Run uncertainty-monitored MD as configured; returns the final ``summary.json`` content.

    Everything that can be checked is checked before the first step (output directory, model,
    structure, ensemble against the structure and the model). A halt stops the run cleanly at
    the first checked frame above the halt threshold (``status: "halted"``); Ctrl-C stops it
    with ``status: "interrupted"``; both still write the summary and the plot.

    Raises:
        FileExistsError, FileNotFoundError, ValueError: bad input, with a message naming it.
    """
    out = prepare_output(config)
    calc, model_path = _load_calculator(config)
    rng = np.random.default_rng(config.seed)
    atoms, start = _initial_state(config, out, rng)
    if start > 0:  # a restart continues with fresh streams, not a replay of those from step 0
        stream = np.random.SeedSequence([config.seed, start])
        rng = np.random.default_rng(stream)
        calc.generator.manual_seed(int(stream.generate_state(1, dtype=np.uint64)[0] >> 1))
    atoms.calc = calc
    check_ensemble(atoms, config.ensemble)
    dyn = make_dynamics(
        atoms,
        config.ensemble,
        **{k: getattr(config, k) for k in _DYNAMICS_KEYS},
        rng=rng,
    )
    dyn.nsteps = start
    info = _run_info(config, model_path, atoms, start)
    run = _Run(config, out, info)
    run.dyn = dyn
    return _execute(config, out, run, dyn, atoms)


_DYNAMICS_KEYS = (
    "timestep_fs",
    "temperature_K",
    "pressure_bar",
    "friction_per_fs",
    "tdamp_fs",
    "pdamp_fs",
    "compressibility_per_bar",
)


def _run_info(config: MDConfig, model_path: Path, atoms: Atoms, start: int) -> dict:
    cfg = asdict(config)
    cfg.pop("thresholds")
    return {
        "model": str(model_path),
        "structure": str(resolve_path(config.structure)) if not config.restart else str(config.structure),
        "formula": atoms.get_chemical_formula(),
        "n_atoms": len(atoms),
        "start_step": start,
        "steps_requested": config.steps,
        "config": cfg,
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
