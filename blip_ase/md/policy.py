"""The policy of an uncertainty-monitored run: thresholds and the verdict on one frame.

The policy follows DP-GEN's trust band with two levels. A frame whose uncertainty is above a
``flag`` threshold is exported for DFT relabelling and the run continues; above ``halt`` the run
stops at that step. Metrics, with ``v_i`` the per-atom trace of the force covariance
(``forces_variance``, eV^2/A^2) and ``F_i`` the Monte Carlo mean force on atom ``i``:

- ``max_force_std = max_i sqrt(v_i)`` (eV/A; DeePMD's max force deviation);
- ``max_relative_force_std = max_i sqrt(v_i) / (|F_i| + nu)`` (dimensionless);
- ``energy_std_per_atom = sqrt(energy_variance) / n_atoms`` (eV/atom).

A non-finite prediction halts whatever the thresholds; the physical checks of
:mod:`blip_ase.md.physics` halt through :func:`with_halt`. Every level above ``ok`` names the
checks that set it (``FrameReport.checks``): ``force_std``, ``relative_force_std``,
``energy_std``, ``non_finite`` and the physical ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers

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
        checks: names of the checks that set ``level`` (empty when ok), e.g. ``("force_std",)``
            or ``("fragmented",)``.
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
    checks: tuple[str, ...] = ()


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
    names: dict[int, list[str]] = {1: [], 2: []}
    for level, mask, name, values, limits in checks:
        if mask.any():
            k = int(np.argmax(np.where(mask, values - limits, -np.inf)))
            reasons[level].append(f"max_{name} {values[k]:.4g} > {limits[k]:g} (atom {k} {symbols[k]})")
            names[level].append(name)
    for level, limit in ((2, t.energy_std_halt), (1, t.energy_std_flag)):
        if limit is not None and e_atom > limit:
            reasons[level].append(f"energy_std_per_atom {e_atom:.4g} > {limit:g}")
            names[level].append("energy_std")
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
        checks=tuple(dict.fromkeys(names[level])) if level else (),
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
        checks=("non_finite",),
    )


def with_halt(report: FrameReport, halts: Sequence[tuple[str, str]]) -> FrameReport:
    """``report`` raised to level 2 by ``halts``, ``(check name, message)`` pairs (e.g. from the
    physical checks, or a non-finite MAP prediction); their messages follow the reason of a
    report that halted already. Returns ``report`` unchanged when ``halts`` is empty."""
    if not halts:
        return report
    messages = [message for _, message in halts]
    names = [name for name, _ in halts]
    if report.level == 2:  # the uncertainty halted too: its reason first, then these
        messages.insert(0, report.reason.removeprefix("halt: "))
        names = [*report.checks, *names]
    return replace(
        report, level=2, reason="halt: " + "; ".join(messages), checks=tuple(dict.fromkeys(names))
    )
