"""Uncertainty monitor for ASE dynamics: Monte Carlo uncertainty every k steps, flag or halt.

The policy follows DP-GEN's trust band with two levels. A frame whose uncertainty is above a
``flag`` threshold is exported for DFT relabelling and the run continues; above ``halt`` the run
stops at that step. Metrics, with ``v_i`` the per-atom trace of the force covariance
(``forces_variance``, eV^2/A^2) and ``F_i`` the Monte Carlo mean force on atom ``i``:

- ``max_force_std = max_i sqrt(v_i)`` (eV/A; DeePMD's max force deviation);
- ``max_relative_force_std = max_i sqrt(v_i) / (|F_i| + nu)`` (dimensionless);
- ``energy_std_per_atom = sqrt(energy_variance) / n_atoms`` (eV/atom).

Usage::

    atoms.calc = BLIPCalculator.from_checkpoint("model.pt", mode="map", n_samples=16)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs)
    monitor = UncertaintyMonitor(dyn, thresholds=Thresholds(force_std_flag=0.2, force_std_halt=1.0))
    dyn.attach(monitor, interval=10)
    dyn.run(1000)
    if monitor.triggered:
        print(monitor.stop_reason)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from ase import Atoms, units
from ase.data import atomic_numbers

from blip_ase.md.writers import FlaggedFrame, FrameWriter, HistoryCSV

LEVELS = ("ok", "flag", "halt")


def _check_pair(name: str, flag: float | None, halt: float | None) -> None:
    for kind, value in (("flag", flag), ("halt", halt)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} {kind} threshold must be a finite number >= 0, got {value!r}")
    if flag is not None and halt is not None and flag > halt:
        raise ValueError(f"{name}: flag threshold {flag:g} is above the halt threshold {halt:g} (need flag <= halt)")


@dataclass(frozen=True)
class Thresholds:
    """Flag and halt thresholds; None switches a metric's level off.

    Attributes:
        force_std_flag, force_std_halt: on the max per-atom force std, eV/A.
        relative_flag, relative_halt: on ``max_i std_i / (|F_i| + nu)``, dimensionless.
        relative_nu: ``nu`` of the relative metric, eV/A (keeps it finite where forces vanish).
        energy_std_flag, energy_std_halt: on the energy std per atom, eV/atom.
        per_element: element symbol -> ``(flag, halt)`` force-std thresholds (eV/A) replacing
            ``force_std_flag``/``force_std_halt`` for atoms of that element.

    Raises:
        ValueError: a negative or non-finite threshold, a flag above its halt, ``nu <= 0``, or an
            unknown element symbol.
    """

    force_std_flag: float | None = None
    force_std_halt: float | None = None
    relative_flag: float | None = None
    relative_halt: float | None = None
    relative_nu: float = 1.0
    energy_std_flag: float | None = None
    energy_std_halt: float | None = None
    per_element: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def __post_init__(self):
        _check_pair("force std", self.force_std_flag, self.force_std_halt)
        _check_pair("relative force std", self.relative_flag, self.relative_halt)
        _check_pair("energy std per atom", self.energy_std_flag, self.energy_std_halt)
        if not self.relative_nu > 0:
            raise ValueError(f"relative_nu must be > 0 eV/A, got {self.relative_nu!r}")
        for symbol, pair in self.per_element.items():
            if symbol not in atomic_numbers:
                raise ValueError(f"per-element threshold for unknown element {symbol!r}")
            _check_pair(f"force std of {symbol}", *pair)

    def atom_thresholds(self, symbols: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(n,)`` flag and halt force-std thresholds per atom (inf where off), eV/A."""
        flag = np.full(len(symbols), np.inf)
        halt = np.full(len(symbols), np.inf)
        for k, symbol in enumerate(symbols):
            f, h = self.per_element.get(symbol, (self.force_std_flag, self.force_std_halt))
            flag[k] = np.inf if f is None else f
            halt[k] = np.inf if h is None else h
        return flag, halt

    def to_dict(self) -> dict:
        out = asdict(self)
        out["per_element"] = {k: list(v) for k, v in self.per_element.items()}
        return out


@dataclass
class FrameReport:
    """Uncertainty of one configuration and the policy's verdict.

    Attributes:
        force_std: ``(n,)`` per-atom force std, eV/A.
        relative_force_std: ``(n,)`` ``force_std / (|F| + nu)``.
        max_force_std, max_relative_force_std: maxima over atoms.
        energy_std: eV; energy_std_per_atom: eV/atom.
        level: 0 ok, 1 flag, 2 halt.
        reason: e.g. ``"halt: max_force_std 1.31 > 1 (atom 2 H)"``; empty when ok.
        flagged_atoms: ``(n,)`` bool, atoms above their force-std or relative flag threshold.
    """

    force_std: np.ndarray
    relative_force_std: np.ndarray
    max_force_std: float
    max_relative_force_std: float
    energy_std: float
    energy_std_per_atom: float
    level: int
    reason: str
    flagged_atoms: np.ndarray


def evaluate_frame(stats: Mapping[str, np.ndarray], atoms: Atoms, thresholds: Thresholds) -> FrameReport:
    """Apply ``thresholds`` to Monte Carlo statistics of ``atoms``.

    Args:
        stats: ``forces (n, 3)`` eV/A, ``forces_variance (n,)`` eV^2/A^2, ``energy_variance`` eV^2.
        atoms: the configuration (for element symbols and the atom count).
        thresholds: the policy.

    Returns:
        The report; a metric is exceeded when it is strictly above its threshold. A non-finite
        prediction or variance (NaN or inf, e.g. two coincident atoms) is level 2 whatever the
        thresholds, with the reason ``"halt: non-finite prediction: ..."`` naming the quantities.
    """
    symbols = atoms.get_chemical_symbols()
    non_finite = non_finite_keys(stats)
    if non_finite:
        return _non_finite_report(stats, atoms, thresholds, non_finite)
    std = np.sqrt(np.clip(np.asarray(stats["forces_variance"], dtype=float).reshape(-1), 0.0, None))
    fnorm = np.linalg.norm(np.asarray(stats["forces"], dtype=float).reshape(-1, 3), axis=1)
    rel = std / (fnorm + thresholds.relative_nu)
    e_std = float(np.sqrt(max(float(stats["energy_variance"]), 0.0)))
    e_atom = e_std / len(atoms)
    flag_i, halt_i = thresholds.atom_thresholds(symbols)
    t = thresholds
    rel_flag = np.inf if t.relative_flag is None else t.relative_flag
    rel_halt = np.inf if t.relative_halt is None else t.relative_halt
    checks = [  # (level, exceeded mask (n,), metric name, values (n,), limits (n,))
        (2, std > halt_i, "force_std", std, halt_i),
        (2, rel > rel_halt, "relative_force_std", rel, np.full(len(atoms), rel_halt)),
        (1, std > flag_i, "force_std", std, flag_i),
        (1, rel > rel_flag, "relative_force_std", rel, np.full(len(atoms), rel_flag)),
    ]
    reasons: dict[int, list[str]] = {1: [], 2: []}
    for level, mask, name, values, limits in checks:
        if mask.any():
            k = int(np.argmax(np.where(mask, values - limits, -np.inf)))
            reasons[level].append(f"max_{name} {values[k]:.4g} > {limits[k]:g} (atom {k} {symbols[k]})")
    for level, limit in ((2, t.energy_std_halt), (1, t.energy_std_flag)):
        if limit is not None and e_atom > limit:
            reasons[level].append(f"energy_std_per_atom {e_atom:.4g} > {limit:g}")
    level = 2 if reasons[2] else 1 if reasons[1] else 0
    return FrameReport(
        force_std=std,
        relative_force_std=rel,
        max_force_std=float(std.max()),
        max_relative_force_std=float(rel.max()),
        energy_std=e_std,
        energy_std_per_atom=e_atom,
        level=level,
        reason=f"{LEVELS[level]}: " + "; ".join(reasons[level]) if level else "",
        flagged_atoms=(std > flag_i) | (rel > rel_flag),
    )


PREDICTION_KEYS = ("energy", "forces", "stress", "energy_variance", "forces_variance", "stress_variance")


def non_finite_keys(stats: Mapping[str, np.ndarray]) -> list[str]:
    """The keys of ``PREDICTION_KEYS`` present in ``stats`` that hold a NaN or an infinity."""
    return [k for k in PREDICTION_KEYS if k in stats and not np.isfinite(np.asarray(stats[k], dtype=float)).all()]


def _non_finite_report(stats, atoms: Atoms, thresholds: Thresholds, keys: list[str]) -> FrameReport:
    """Level 2 for a frame with non-finite predictions; metrics are NaN where undefined.

    NaN compares False with every threshold, so without this a NaN frame would pass as level 0.
    """
    n = len(atoms)
    variance = np.asarray(stats.get("forces_variance", np.full(n, np.nan)), dtype=float).reshape(-1)
    std = np.sqrt(np.abs(variance))
    fnorm = np.linalg.norm(np.asarray(stats["forces"], dtype=float).reshape(-1, 3), axis=1)
    rel = std / (fnorm + thresholds.relative_nu)
    e_std = float(np.sqrt(abs(float(stats.get("energy_variance", np.nan)))))
    return FrameReport(
        force_std=std,
        relative_force_std=rel,
        max_force_std=float(np.max(std)) if np.isfinite(std).all() else float("nan"),
        max_relative_force_std=float(np.max(rel)) if np.isfinite(rel).all() else float("nan"),
        energy_std=e_std,
        energy_std_per_atom=e_std / n,
        level=2,
        reason="halt: non-finite prediction: " + ", ".join(keys),
        flagged_atoms=~(np.isfinite(std) & np.isfinite(fnorm)),
    )


class UncertaintyMonitor:
    """Observer for ASE dynamics: ``dyn.attach(monitor, interval=k)``.

    Each call evaluates ``atoms.calc.monte_carlo(atoms, n_samples)`` for the current frame (a
    :class:`~blip_ase.calculator.BLIPCalculator`, typically in ``mode="map"`` so that MAP forces
    propagate the dynamics), records the history, exports frames above ``flag`` to every writer
    and stops the dynamics at the first frame above ``halt`` (``dyn.max_steps`` is set to the
    current step, so ``run()`` returns right after this step's observers).

    Args:
        dyn: the ASE dynamics (for ``nsteps``, ``get_time()``, ``atoms`` and stopping).
        thresholds: the policy.
        writers: flagged-frame writers (:class:`~blip_ase.md.writers.ExtXYZFrameWriter`, ...).
        history_file: optional CSV receiving one line per checked frame.
        n_samples: Monte Carlo samples per check (None = the calculator's ``n_samples``).
        atoms: the atoms carrying the calculator (default ``dyn.atoms``, unwrapping a filter).
        on_check: called as ``on_check(monitor, report)`` after each check (progress bars).

    Attributes:
        history: one dict per check, keys ``HISTORY_FIELDS`` of :mod:`blip_ase.md.writers`.
        triggered: True once a frame went above ``halt``.
        stop_reason: why the run halted (None while it has not).
        last: the latest :class:`FrameReport`.
        n_checked, n_flagged: counts; ``uq_seconds``: wall time spent in Monte Carlo.
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
    ):
        self.dyn = dyn
        self.thresholds = thresholds
        self.writers = list(writers)
        self.history_file = history_file
        self.n_samples = n_samples
        self.atoms = atoms if atoms is not None else getattr(dyn.atoms, "atoms", dyn.atoms)
        self.on_check = on_check
        self.history: list[dict] = []
        self.triggered = False
        self.stop_reason: str | None = None
        self.halt_step: int | None = None
        self.last: FrameReport | None = None
        self.n_checked = 0
        self.n_flagged = 0
        self.uq_seconds = 0.0

    def __call__(self) -> None:
        atoms = self.atoms
        calc = atoms.calc
        if not hasattr(calc, "monte_carlo"):
            raise TypeError(
                f"UncertaintyMonitor needs a calculator with monte_carlo() (BLIPCalculator), got {type(calc).__name__}"
            )
        map_bad = self._non_finite_results()
        start = time.perf_counter()
        stats = calc.monte_carlo(atoms, n_samples=self.n_samples)
        self.uq_seconds += time.perf_counter() - start
        report = evaluate_frame(stats, atoms, self.thresholds)
        if map_bad and report.level < 2:  # the MAP forces that drive the dynamics are unusable
            report = replace(report, level=2, reason="halt: non-finite prediction: MAP " + ", ".join(map_bad))
        step, time_fs = int(self.dyn.nsteps), round(float(self.dyn.get_time() / units.fs), 9)
        record = {
            "step": step,
            "time_fs": time_fs,
            "temperature_K": float(atoms.get_temperature()),
            "max_force_std": report.max_force_std,
            "max_relative_force_std": report.max_relative_force_std,
            "energy_std": report.energy_std,
            "energy_std_per_atom": report.energy_std_per_atom,
            "level": report.level,
        }
        self.history.append(record)
        self.n_checked += 1
        self.last = report
        if self.history_file is not None:
            self.history_file.write(record)
        if report.level >= 1:
            self._export(atoms, stats, report, step, time_fs)
        if report.level == 2:
            self.triggered = True
            self.halt_step = step
            self.stop_reason = f"step {step}: {report.reason}"
            self.dyn.max_steps = self.dyn.nsteps
        if self.on_check is not None:
            self.on_check(self, report)

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
            self()

    def _non_finite_results(self) -> list[str]:
        """Keys of the calculator's current results (this configuration) that are not finite."""
        calc = self.atoms.calc
        results = getattr(calc, "results", None)
        if not results or calc.atoms is None or calc.check_state(self.atoms):
            return []
        return non_finite_keys({k: results[k] for k in ("energy", "forces", "stress") if k in results})

    def _export(self, atoms: Atoms, stats: Mapping, report: FrameReport, step: int, time_fs: float) -> None:
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
        )
        for writer in self.writers:
            writer.write(frame)
        self.n_flagged += 1

    def summary(self) -> dict:
        """Counts, thresholds, stop reason and Monte Carlo timing, JSON-serialisable."""
        stds = [r["max_force_std"] for r in self.history if np.isfinite(r["max_force_std"])]
        return {
            "n_checked": self.n_checked,
            "n_flagged": self.n_flagged,
            "halted": self.triggered,
            "halt_step": self.halt_step,
            "stop_reason": self.stop_reason,
            "thresholds": self.thresholds.to_dict(),
            "max_force_std_max": max(stds) if stds else None,  # over finite values: NaN frames halt
            "max_force_std_mean": float(np.mean(stds)) if stds else None,
            "uq_seconds": self.uq_seconds,
            "exports": [str(w.path) for w in self.writers],
        }
