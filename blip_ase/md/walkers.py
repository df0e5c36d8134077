"""Batched many-walker uncertainty-monitored MD on torch-sim: :func:`run_walkers` (``blip md --walkers N``).

``N`` walkers (each with its own seed, temperature and start structure) are integrated together
as one torch-sim ``SimState`` by torch-sim's own integrators (``nve``, ``nvt_langevin``), driven
by the MAP forces of :class:`~blip_ase.md.torchsim.BLIPModel`. Every ``uq_interval`` steps (each
walker's gap adapts up to ``uq_max_interval``: :mod:`blip_ase.md.schedule`) the Monte Carlo
uncertainty of the running walkers that are due is computed in one batched pass and the run's
:class:`~blip_ase.md.policy.Thresholds` and physical checks are applied to each walker on its own
(:func:`~blip_ase.md.policy.evaluate_frame`, the policy of ``blip md``): a flagged walker's frame is
exported with its walker id and it goes on; a halted walker (above a halt threshold, failing a
physical check, or a non-finite MAP prediction at any step) is exported, removed from the batch
while the others run on, and with ``respawn`` started again from its start structure with a new
seed.

Reproducibility: walker ``k`` uses seed ``seed + k`` for its initial velocities (as
``blip md --seed``) and its Monte Carlo noise, which is drawn from generators of its own, so its
uncertainties do not depend on its batch-mates. With ``nve`` a walker's whole trajectory is the
same in any batch (tested against single-walker runs). torch-sim 0.3.0's Langevin integrator
draws its thermostat noise from torch's global generator for the whole batch (it takes no
generator), so a Langevin run is reproducible for the same seed and walkers, but a walker's path
depends on the batch it runs in. Other ensembles are refused (see :data:`REFUSED`).

Thresholds in calibrated units are resolved to eV/A per element once, against the model's
calibration reference, before the run starts (``summary.json``: ``thresholds`` resolved,
``config.thresholds`` as given). Every walker has its own :class:`~blip_ase.md.tracker.Tracker`
(the one ``run_md`` uses: same policy, physical checks, records, exports and stop reasons); the
summary counts the walkers per status (``n_running``, ``n_completed``, ``n_halted``,
``n_interrupted``).

Outputs in ``out``: ``flagged.extxyz`` and ``flagged.h5`` (as ``blip md``, plus ``walker``),
``uncertainty.csv`` (``walker`` first), ``uncertainty.png`` (one labelled line per walker, the
legend outside the axes),
``walker_<k>.traj`` (every ``traj_interval`` steps and the last frame) and ``summary.json`` (one
entry per walker with its status and stop reason).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units

from blip_ase import interrupts
from blip_ase.md.config import MDConfig
from blip_ase.md.dynamics import thermalize
from blip_ase.md.inputs import check_inputs, load_calculator, read_structures, structure_path
from blip_ase.md.lifecycle import RunLifecycle, check_output, prepare_output
from blip_ase.md.policy import resolve_for_calculator
from blip_ase.md.tracker import Tracker
from blip_ase.md.writers import ExtXYZFrameWriter, HDF5FrameWriter, WalkerHistoryCSV, plot_history, read_history

ENGINE_ENSEMBLES = {"nve": "nve", "nvt-langevin": "nvt_langevin"}
"""``blip md`` ensemble -> the torch-sim 0.3.0 integrator that runs it for batched walkers."""
REFUSED = {
    "nvt-nose-hoover": "torch-sim 0.3.0's nvt_nose_hoover couples all systems of a batch to one thermostat chain "
    "(its chain state is global), so the walkers would not be independent",
    "nvt-bussi": "torch-sim 0.3.0 has no Bussi (stochastic velocity rescaling) integrator",
    "npt-mtk-isotropic": "batched NPT is not offered: walkers run NVE or NVT",
    "npt-mtk": "batched NPT is not offered: walkers run NVE or NVT",
    "npt-berendsen": "batched NPT is not offered: walkers run NVE or NVT",
}


CPU_MAX_BATCH_ATOMS = 4096
"""Atoms per batched Monte Carlo pass of the walkers on CPU (the engine's CPU default is 256); the
measurement behind it is in the documentation (``docs/benchmarks.md``, walker throughput)."""


@dataclass(frozen=True)
class WalkersConfig:
    """A many-walker run: the shared settings of ``md`` plus what differs between walkers.

    Attributes:
        md: the run's settings (ensemble, steps, thresholds, seed, output, ...); ``md.structure``
            and ``md.temperature_K`` apply where ``structures``/``temperatures_K`` are empty.
        n_walkers: number of walkers ``N``.
        temperatures_K: one thermostat temperature per walker, or one for all; empty: ``md``'s.
        structures: start structures; walker ``k`` starts from ``starts[k % len(starts)]``, where
            the starts are all frames of every file in order (``FILE@INDEX`` or ``FILE@A:B``
            picks frames); empty: ``md.structure`` (or the shipped NH3).
        respawn: restart a halted walker from its start structure with a new seed instead of
            removing it.

    Raises:
        ValueError: ``n_walkers < 1``, a temperature list of another length than 1 or ``N``, a
            negative temperature, or a restart (batched runs cannot be restarted).
    """

    md: MDConfig = field(default_factory=MDConfig)
    n_walkers: int = 1
    temperatures_K: tuple[float, ...] = ()
    structures: tuple[str, ...] = ()
    respawn: bool = False

    def __post_init__(self):
        if isinstance(self.n_walkers, bool) or int(self.n_walkers) != self.n_walkers or self.n_walkers < 1:
            raise ValueError(f"the number of walkers must be an integer >= 1, got {self.n_walkers!r}")
        if self.temperatures_K and len(self.temperatures_K) not in (1, self.n_walkers):
            raise ValueError(
                f"{len(self.temperatures_K)} temperatures for {self.n_walkers} walkers: give one temperature for "
                "all or one per walker"
            )
        if any(not t >= 0 for t in self.temperatures_K):
            raise ValueError(f"temperatures must be >= 0 K, got {list(self.temperatures_K)}")
        if self.md.restart:
            raise ValueError("a batched many-walker run cannot be restarted; start a new run with another --out")
        if self.md.ensemble not in ENGINE_ENSEMBLES:
            reason = REFUSED[self.md.ensemble]
            raise ValueError(f"--walkers cannot run {self.md.ensemble}: {reason}; use nve or nvt-langevin")

    def temperature(self, k: int) -> float:
        if not self.temperatures_K:
            return self.md.temperature_K
        return self.temperatures_K[k if len(self.temperatures_K) > 1 else 0]


@dataclass
class Walker:
    """One walker's settings and bookkeeping."""

    index: int
    seed: int
    temperature_K: float
    source: str
    start: Atoms
    generator: torch.Generator = field(default_factory=torch.Generator)
    status: str = "running"
    respawns: int = 0
    tracker: Tracker | None = None

    def summary(self) -> dict:
        mine = self.tracker.summary()
        return {
            "walker": self.index,
            "status": self.status,
            "stop_reason": mine["stop_reason"],
            "stop_check": mine["stop_check"],
            "halt_step": mine["halt_step"],
            "seed": self.seed,
            "temperature_K": self.temperature_K,
            "structure": self.source,
            "n_checked": mine["n_checked"],
            "n_flagged": mine["n_flagged"],
            "n_screened": mine["n_screened"],
            "respawns": self.respawns,
            "max_force_std_max": mine["max_force_std_max"],
        }


def _walkers(config: WalkersConfig, model) -> list[Walker]:
    """The walkers of ``config``, their start structures read and checked against ``model``."""
    specs = config.structures or (structure_path(config.md),)
    starts = [entry for spec in specs for entry in read_structures(str(spec))]
    for source, atoms in starts:
        check_inputs(atoms, model, config.md, source=source)
    if len({bool(a.pbc.any()) for _, a in starts}) > 1 or any(a.pbc.any() and not a.pbc.all() for _, a in starts):
        raise ValueError(
            "the start structures mix periodic and non-periodic cells (or are periodic in only some directions): "
            "torch-sim 0.3.0 holds one pbc flag for a whole batch; run them as separate batches"
        )
    walkers = []
    for k in range(config.n_walkers):
        source, atoms = starts[k % len(starts)]
        seed = config.md.seed + k
        walkers.append(Walker(k, seed, config.temperature(k), source, atoms.copy()))
        walkers[-1].generator.manual_seed(seed)
    return walkers


def _seed_of_respawn(config: WalkersConfig, walker: Walker) -> int:
    return int(np.random.SeedSequence([config.md.seed, walker.index, walker.respawns]).generate_state(1)[0])


class WalkerRun:
    """The state of a running batch: torch-sim state, walkers in state order, writers, counts.

    Args:
        config: the run. model: the :class:`~blip_ase.md.torchsim.BLIPModel`.
        walkers: from :func:`_walkers`. out: the (created) output directory.
        cutoff_A: the model's cutoff (the physical checks' isolated-atom distance), Angstrom.
    """

    def __init__(self, config: WalkersConfig, model, walkers: list[Walker], out: Path, *, cutoff_A: float):
        import torch_sim as ts

        self.config, self.model, self.walkers, self.out = config, model, walkers, out
        md = config.md
        tensor = {"dtype": model.dtype, "device": model.device}
        self.dt = torch.tensor(md.timestep_fs * units.fs, **tensor)
        integrator = getattr(ts.integrators, ENGINE_ENSEMBLES[md.ensemble])
        langevin = md.ensemble == "nvt-langevin"
        extra = {"gamma": torch.tensor(md.friction_per_fs / units.fs, **tensor)} if langevin else {}
        kT = torch.tensor([w.temperature_K * units.kB for w in walkers], **tensor)
        self.init_fn, self.update_fn = integrator(model, dt=self.dt, kT=kT, **extra)
        self.tensor = tensor
        self.writers = [ExtXYZFrameWriter(out / "flagged.extxyz"), HDF5FrameWriter(out / "flagged.h5")]
        self.history = WalkerHistoryCSV(out / "uncertainty.csv")
        for w in walkers:
            w.tracker = Tracker(
                md.thresholds, physical=md.physical, reference=w.start, cutoff_A=cutoff_A,
                target_K=w.temperature_K, writers=self.writers, history_file=self.history, extra={"walker": w.index},
                anchor_steps=md.screen_anchor_steps, schedule=md.schedule(),
            )  # fmt: skip
        self.trajectories: dict[int, object] = {}
        self.written: dict[int, int] = {}  # walker -> step of its last trajectory frame
        self.uq_seconds = 0.0
        self.walker_steps = 0
        self.step = 0
        self.active: list[int] = []
        self.state = None

    # --- state -------------------------------------------------------------------------------
    def start_state(self, indices: list[int], seeds: list[int]):
        """A fresh, initialised torch-sim state of the walkers ``indices`` at their start structures,
        with Maxwell-Boltzmann velocities drawn as ``blip md`` draws them for each seed."""
        from torch_sim.integrators import MDState
        from torch_sim.io import atoms_to_state

        md = self.config.md
        starts = []
        for k, seed in zip(indices, seeds):
            atoms = self.walkers[k].start.copy()
            T0 = self.walkers[k].temperature_K if md.init_temperature_K is None else md.init_temperature_K
            thermalize(atoms, T0, rng=np.random.default_rng(seed))
            starts.append(atoms)
        base = atoms_to_state(starts, **self.tensor)
        momenta = torch.tensor(np.concatenate([a.get_momenta() for a in starts]), **self.tensor)
        state = MDState(
            positions=base.positions, momenta=momenta, energy=torch.zeros(len(starts), **self.tensor),
            forces=torch.zeros_like(base.positions), masses=base.masses, cell=base.cell, pbc=base.pbc,
            atomic_numbers=base.atomic_numbers, system_idx=base.system_idx,
        )  # fmt: skip
        return self.init_fn(state, kT=self.kT(indices))

    def kT(self, indices: list[int]) -> torch.Tensor:
        return torch.tensor([self.walkers[k].temperature_K * units.kB for k in indices], **self.tensor)

    def advance(self) -> None:
        """One step of every running walker."""
        self.state = self.update_fn(self.state, kT=self.kT(self.active))
        self.step += 1
        self.walker_steps += len(self.active)

    def temperatures(self) -> np.ndarray:
        """Instantaneous temperature of each system (K), ``2 E_kin / (3 n k_B)`` as ASE's."""
        s = self.state
        ekin = 0.5 * (s.momenta**2).sum(dim=1) / s.masses
        per_system = torch.zeros(s.n_systems, **self.tensor).index_add_(0, s.system_idx, ekin)
        n = s.n_atoms_per_system.to(per_system.dtype)
        return (2.0 * per_system / (3.0 * n * units.kB)).cpu().numpy()

    # --- monitoring --------------------------------------------------------------------------
    def non_finite_systems(self) -> list[int]:
        """State positions of systems whose MAP energy or forces are not finite."""
        s = self.state
        bad_atoms = (~torch.isfinite(s.forces).all(dim=1)).to(torch.long)
        bad = (~torch.isfinite(s.energy)).to(torch.long).index_add(0, s.system_idx, bad_atoms)
        return torch.nonzero(bad).flatten().tolist()

    def check(self, positions: list[int], *, map_bad: bool = False) -> list[int]:
        """Check the systems at state ``positions`` (the screen first where it applies, Monte Carlo
        for the rest, all in one batched pass); returns those that halted."""
        if not positions:
            return []
        start = time.perf_counter()
        md = self.config.md
        temperatures = self.temperatures()
        time_fs = round(self.step * md.timestep_fs, 9)
        physical: dict[int, list] = {}
        if md.screen and not map_bad and self.model.engine.screen is not None:
            positions, physical = self.screen(positions, temperatures, time_fs)
        halted = []
        if positions:
            state = self.state if len(positions) == self.state.n_systems else self.state[positions]
            walkers = [self.walkers[self.active[p]] for p in positions]
            stats = self.model.monte_carlo(state, [w.generator for w in walkers], md.n_samples)
            for p, walker, atoms, st in zip(positions, walkers, _structures(state), stats):
                report = walker.tracker.check(
                    atoms, st, step=self.step, time_fs=time_fs, temperature_K=float(temperatures[p]),
                    map_bad=("energy", "forces") if map_bad else (), physical=physical.get(p),
                )  # fmt: skip
                if report.level == 2:
                    walker.status = "halted"
                    halted.append(p)
        self.uq_seconds += time.perf_counter() - start
        return halted

    def screen(self, positions: list[int], temperatures: np.ndarray, time_fs: float) -> tuple[list[int], dict]:
        """Let the uncertainty screen clear what it can of ``positions`` (one inference-network
        pass for the whole batch, on the MAP forces of this step). Returns the positions that
        still need Monte Carlo samples and, for them, the physical checks' halts already found."""
        prepared = self.model.prepare(self.state)
        forces = self.state.forces.detach().to("cpu", torch.float64).numpy()
        bounds = self.model.engine.screen_bound(prepared, forces=forces)
        energies = self.state.energy.detach().to("cpu", torch.float64).numpy()
        due = self.state if len(positions) == self.state.n_systems else self.state[positions]
        remaining, physical = [], {}
        for p, atoms in zip(positions, _structures(due)):  # Atoms of the due walkers only
            verdict = self.walkers[self.active[p]].tracker.screen(
                atoms, energy_eV=float(energies[p]), bound=bounds[p], step=self.step, time_fs=time_fs,
                temperature_K=float(temperatures[p]),
            )  # fmt: skip
            if isinstance(verdict, list):
                remaining.append(p)
                physical[p] = verdict
        return remaining, physical

    def remove(self, positions: list[int], *, respawn: bool = True) -> list[int]:
        """Take the halted systems out of the batch; with ``respawn`` (and the run's ``respawn``)
        replace them by fresh walkers from their start structures, appended at the end. Returns
        the state positions of the fresh walkers."""
        if not positions:
            return []
        gone = [self.active[p] for p in positions]
        for k in gone:
            self.write_frame(k, self.state[[positions[gone.index(k)]]])
        keep = [p for p in range(len(self.active)) if p not in positions]
        self.active = [self.active[p] for p in keep]
        self.state = self.state[keep] if keep else None
        if not (respawn and self.config.respawn):
            return []
        for k in gone:
            walker = self.walkers[k]
            walker.respawns += 1
            walker.status = "running"
            walker.tracker.rearm(self.step)
        fresh = self.start_state(gone, [_seed_of_respawn(self.config, self.walkers[k]) for k in gone])
        self.state = fresh if self.state is None else _concatenate([self.state, fresh])
        self.active += gone
        return list(range(len(self.active) - len(gone), len(self.active)))

    # --- trajectories ------------------------------------------------------------------------
    def write_frames(self) -> None:
        for p, k in enumerate(self.active):
            self.write_frame(k, self.state[[p]])

    def write_frame(self, k: int, state) -> None:
        from ase.io.trajectory import Trajectory

        if self.written.get(k) == self.step:
            return
        self.written[k] = self.step
        atoms = _structures(state)[0]
        atoms.set_momenta(state.momenta.detach().to("cpu", torch.float64).numpy())
        atoms.info.update(step=self.step, walker=k)
        if k not in self.trajectories:
            self.trajectories[k] = Trajectory(str(self.out / f"walker_{k}.traj"), "w")
        self.trajectories[k].write(atoms)

    def close(self) -> None:
        for traj in self.trajectories.values():
            traj.close()

    def summary_state(self, wall: float) -> dict:
        """The live fields of the summary: counts over walkers, each walker, timings."""
        per_walker = [w.summary() for w in self.walkers]
        return {
            "final_step": self.step,
            **{f"n_{status}": sum(w.status == status for w in self.walkers) for status in WALKER_STATUSES},
            "n_checked": sum(w["n_checked"] for w in per_walker),
            "n_flagged": sum(w["n_flagged"] for w in per_walker),
            "n_screened": sum(w["n_screened"] for w in per_walker),
            "thresholds": self.config.md.thresholds.to_dict(),
            "walkers": per_walker,
            "timings": {
                "wall_seconds": wall,
                "uq_seconds": self.uq_seconds,
                "md_seconds": wall - self.uq_seconds,
                "walker_steps": self.walker_steps,
                "walker_steps_per_second": self.walker_steps / wall if wall > 0 else None,
            },
        }


def _structures(state) -> list[Atoms]:
    from blip_ase.md.torchsim import state_structures

    return state_structures(state)


def _concatenate(states):
    from torch_sim.state import concatenate_states

    return concatenate_states(states)


def run_walkers(config: WalkersConfig) -> dict:
    """Run ``config.n_walkers`` monitored walkers as one batch; returns the final summary.

    Everything is checked before ``out`` is created (model, every start structure, thresholds,
    ensemble, output directory). Ctrl-C or SIGTERM (through ``blip md``) stops the run cleanly
    (``status: "interrupted"``). The run's ``status`` is ``completed`` when it reached its steps
    with at least one walker, ``halted`` when every walker halted before, and each walker has its
    own status (``completed`` or ``halted``) and stop reason in ``walkers``.

    Raises:
        FileExistsError, FileNotFoundError, ValueError: bad input, named, before anything exists.
    """
    from blip_ase.md.torchsim import BLIPModel

    md = config.md
    calc, path = load_calculator(md)
    if calc.model.device.type == "cpu":  # many small systems: one pass for all samples is faster
        calc.max_batch_atoms = max(calc.max_batch_atoms, CPU_MAX_BATCH_ATOMS)
    walkers = _walkers(config, calc.model)
    resolved = replace(md, thresholds=resolve_for_calculator(md.thresholds, calc, source=str(path)))  # in eV/A
    check_output(md, restartable=False)
    model = BLIPModel(calc)
    out = prepare_output(md, OUTPUT_FILES, restartable=False)
    run = WalkerRun(replace(config, md=resolved), model, walkers, out, cutoff_A=calc.model.cutoff)
    life = RunLifecycle(
        out, _run_info(config, path, walkers), state=run.summary_state, step=lambda: run.step,
        summary_every_s=md.summary_every_s,
    )  # fmt: skip
    life.tick(now=True)

    def loop() -> None:
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            torch.manual_seed(md.seed)  # torch-sim's Langevin noise comes from the global generator
            _execute(run, life)

    def cleanup() -> None:
        if run.state is not None:
            run.write_frames()  # the last frame of every running walker
        run.close()

    status = life.run(loop, cleanup=cleanup)
    for w in walkers:
        if w.status == "running":
            w.status = "completed" if status == "completed" else status
    if status == "completed" and not run.active:
        status = "halted"

    def plot(png: Path, summary: dict) -> None:
        title = f"{config.n_walkers} walkers {md.ensemble} ({summary['status']})"
        t = resolved.thresholds
        labels = {w.index: f"walker {w.index}, {w.temperature_K:g} K ({w.status})" for w in walkers}
        plot_history(png, read_history(out / "uncertainty.csv"), flag=t.force_std_flag, halt=t.force_std_halt,
                     title=title, labels=labels, per_element=t.per_element)  # fmt: skip

    return life.finish(status, plot if md.plot else None)


WALKER_STATUSES = ("running", "completed", "halted", "interrupted")
"""A walker's status; the summary counts each (``n_running``, ``n_completed``, ...)."""
OUTPUT_FILES = ("flagged.extxyz", "flagged.h5", "uncertainty.csv", "uncertainty.png", "summary.json", "walker_*.traj")
"""What a batched run writes (removed from ``out`` first with ``overwrite``)."""


def _execute(run: WalkerRun, life: RunLifecycle) -> None:
    md = run.config.md
    run.active = list(range(len(run.walkers)))
    run.state = run.start_state(run.active, [w.seed for w in run.walkers])
    pbar = None
    if md.progress:
        from tqdm import tqdm

        pbar = tqdm(total=md.steps, unit="step", dynamic_ncols=True)
    try:
        while True:
            interrupts.raise_pending()  # a signal whose exception Python swallowed (blip_ase.interrupts)
            bad = run.non_finite_systems()
            halted = run.check(bad, map_bad=True) if bad else []
            trackers = [run.walkers[k].tracker for k in run.active]
            due = [p for p, tracker in enumerate(trackers) if p not in bad and tracker.due(run.step)]
            halted += run.check(due)
            if run.step % md.traj_interval == 0:
                run.write_frames()
            fresh = run.remove(sorted(halted))
            if fresh:  # respawned walkers are checked at their start; one that halts there is not respawned again
                bad = set(run.non_finite_systems())
                again = run.check([p for p in fresh if p in bad], map_bad=True)
                again += run.check([p for p in fresh if p not in bad])
                run.remove(sorted(again), respawn=False)
            if run.state is None or run.step >= md.steps:
                break
            run.advance()
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix_str(f"{len(run.active)} walkers running", refresh=False)
            life.tick(now=bool(halted))
    finally:
        if pbar is not None:
            pbar.close()


def _run_info(config: WalkersConfig, path: Path, walkers: list[Walker]) -> dict:
    return {
        "engine": f"torch-sim {_torch_sim_version()} {ENGINE_ENSEMBLES[config.md.ensemble]}",
        "model": str(path),
        "n_walkers": config.n_walkers,
        "steps_requested": config.md.steps,
        "config": {
            **config.md.to_dict(),
            "model": str(path.resolve()),
            "n_walkers": config.n_walkers,
            "temperatures_K": [w.temperature_K for w in walkers],
            "structures": sorted({w.source for w in walkers}),
            "respawn": config.respawn,
        },
        "outputs": {
            "flagged": [str(Path(config.md.out) / "flagged.extxyz"), str(Path(config.md.out) / "flagged.h5")],
            "history": str(Path(config.md.out) / "uncertainty.csv"),
            "trajectories": str(Path(config.md.out) / "walker_<k>.traj"),
        },
    }


def _torch_sim_version() -> str:
    from importlib.metadata import version

    return version("torch-sim-atomistic")
