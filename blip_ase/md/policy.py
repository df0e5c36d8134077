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

Force-std thresholds come in two forms: absolute (eV/A, they belong to one model) and calibrated
(multiples of a quantile of the per-atom force errors that ``blip calibrate`` measured on its
validation data and stored in the checkpoint under ``reference``, per element; see
:func:`blip_ase.uq.calibration.force_reference`). :meth:`Thresholds.resolve` turns the calibrated
form into the absolute one for a given model, once, when a run loads it; the per-check code
only ever sees eV/A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

LEVELS = ("ok", "flag", "halt")
DEFAULT_CALIBRATED_FLAG = 1.4
"""Default flag multiple of ``blip md`` and ``blip learn`` (of the q99 of the per-atom force errors):
on the shipped model 0.25 eV/A for H, the earlier absolute default, and 0.31 eV/A for N; it flags
about as many checks as 0.25 did at 300-1200 K (docs/guide/md.md, "Thresholds")."""
DEFAULT_CALIBRATED_HALT = 5.6
"""Default halt multiple, 4x the flag as before: on the shipped model 0.99 eV/A for H, 1.24 eV/A for N."""
DEFAULT_CALIBRATED_QUANTILE = 0.99


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
        calibrated_flag, calibrated_halt: force-std thresholds in calibrated units: an atom of
            element X is above them when its force std exceeds this multiple of the
            ``calibrated_quantile`` of the per-atom force errors ``|F_true - F_pred|`` of element
            X on the model's calibration data (``blip calibrate`` stores them; an element the
            calibration data lacked uses all atoms'). Exclusive with ``force_std_flag`` /
            ``force_std_halt`` for the same level; :meth:`resolve` turns them into eV/A.
        calibrated_quantile: the quantile level of the calibrated thresholds, one of those the
            checkpoint stores (``blip calibrate``: 0.5, 0.9, 0.95, 0.99, 1.0).
        relative_flag, relative_halt: on ``max_i std_i / (|F_i| + nu)``, dimensionless.
        relative_nu: ``nu`` of the relative metric, eV/A (keeps it finite where forces vanish).
        energy_std_flag, energy_std_halt: on the energy std per atom, eV/atom.
        per_element: element symbol -> ``(flag, halt)`` force-std thresholds (eV/A) replacing
            ``force_std_flag``/``force_std_halt`` for atoms of that element.

    Raises:
        ValueError: a negative or non-finite threshold, a flag above its halt, ``nu <= 0``, an
            unknown element symbol, a quantile level outside (0, 1], or an absolute and a
            calibrated force-std threshold for the same level.
    """

    force_std_flag: float | None = None
    force_std_halt: float | None = None
    calibrated_flag: float | None = None
    calibrated_halt: float | None = None
    calibrated_quantile: float = DEFAULT_CALIBRATED_QUANTILE
    relative_flag: float | None = None
    relative_halt: float | None = None
    relative_nu: float = 1.0
    energy_std_flag: float | None = None
    energy_std_halt: float | None = None
    per_element: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def __post_init__(self):
        _check_pair("force std", self.force_std_flag, self.force_std_halt)
        _check_pair("calibrated force std", self.calibrated_flag, self.calibrated_halt)
        for level in ("flag", "halt"):
            absolute, calibrated = getattr(self, f"force_std_{level}"), getattr(self, f"calibrated_{level}")
            if absolute is not None and calibrated is not None:
                raise ValueError(
                    f"the {level} force-std threshold is given twice, in eV/A (force_std_{level} {absolute:g}) and in "
                    f"calibrated units (calibrated_{level} {calibrated:g}); give one of them"
                )
        q = self.calibrated_quantile
        if isinstance(q, bool) or not (isinstance(q, (int, float)) and 0 < q <= 1):
            raise ValueError(f"calibrated_quantile must be a quantile level in (0, 1], got {q!r}")
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

    def screen_limits(self, symbols: Sequence[str]) -> np.ndarray | None:
        """``(n,)`` per-atom force-std limits (eV/A) below which a frame can be cleared without
        Monte Carlo samples: the flag threshold, or the halt threshold where no flag is set.
        None when the policy needs samples anyway (relative or energy thresholds) or sets no
        force-std threshold at all."""
        if any(v is not None for v in (self.relative_flag, self.relative_halt, self.energy_std_flag,
                                       self.energy_std_halt)):  # fmt: skip
            return None
        flag, halt = self.atom_thresholds(symbols)
        limits = np.where(np.isfinite(flag), flag, halt)
        return limits if np.isfinite(limits).all() else None

    @property
    def calibrated(self) -> bool:
        """Whether a force-std threshold is in calibrated units (:meth:`resolve` is needed)."""
        return self.calibrated_flag is not None or self.calibrated_halt is not None

    def resolve(self, reference: Mapping | None, symbols: Sequence[str], *, source: str = "the model") -> Thresholds:
        """These thresholds in eV/A for one model: the calibrated ones become per-element values.

        Args:
            reference: the checkpoint's ``reference`` (``blip calibrate``; None: not calibrated).
            symbols: the elements to resolve (the model's); each gets a ``per_element`` entry.
            source: the model, named in the messages (its checkpoint path).

        Returns:
            ``self`` when nothing is calibrated; else a copy without calibrated thresholds whose
            ``per_element`` holds ``(flag, halt)`` for every element of ``symbols`` (explicit
            ``per_element`` entries win) and whose ``force_std_flag``/``force_std_halt`` hold
            the values over all atoms of the calibration data.

        Raises:
            ValueError: no reference, ``calibrated_quantile`` not among its levels, or a
                resolved flag above its halt (a calibrated flag with an absolute halt).
        """
        if not self.calibrated:
            return self
        given = ", ".join(f"calibrated_{k} {getattr(self, f'calibrated_{k}'):g}" for k in ("flag", "halt")
                          if getattr(self, f"calibrated_{k}") is not None)  # fmt: skip
        if reference is None:
            raise ValueError(
                f"{source} has no calibration reference, so thresholds in calibrated units ({given}) cannot be "
                f"resolved: calibrate it first (blip calibrate --model {source} --data VALIDATION_DATA --out "
                "CALIBRATED.pt stores the force-error quantiles), or give absolute thresholds in eV/A "
                "(blip md --flag-force-std-eV-per-A / --halt-force-std-eV-per-A; force_std_flag / force_std_halt)"
            )
        errors = reference["force_error"]
        pair = _calibrated_pair(self, reference, source)
        per_element = {symbol: pair(errors.get(symbol, errors["all"])) for symbol in symbols}
        per_element.update(self.per_element)
        flag, halt = pair(errors["all"])
        try:
            return replace(self, force_std_flag=flag, force_std_halt=halt, calibrated_flag=None,
                           calibrated_halt=None, per_element=per_element)  # fmt: skip
        except ValueError as exc:
            raise ValueError(f"thresholds resolved on {source} ({given}): {exc}") from None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["per_element"] = {k: list(v) for k, v in self.per_element.items()}
        return out


DEFAULT_THRESHOLDS = Thresholds(calibrated_flag=DEFAULT_CALIBRATED_FLAG, calibrated_halt=DEFAULT_CALIBRATED_HALT)
"""The thresholds of ``blip md`` and ``blip learn`` when none are given (calibrated units)."""


def _calibrated_pair(thresholds: Thresholds, reference: Mapping, source: str):
    """A function ``quantiles -> (flag, halt)`` in eV/A, from one element's force-error quantiles."""
    levels = [float(q) for q in reference["quantiles"]]
    matches = [k for k, q in enumerate(levels) if np.isclose(q, thresholds.calibrated_quantile, rtol=0, atol=1e-9)]
    if not matches:
        raise ValueError(
            f"calibrated_quantile {thresholds.calibrated_quantile:g} is not one of the quantile levels the calibration "
            f"of {source} stored: {', '.join(f'{q:g}' for q in levels)}"
        )
    k = matches[0]

    def pair(quantiles: Sequence[float]) -> tuple[float | None, float | None]:
        out = []
        for level in ("flag", "halt"):
            multiple = getattr(thresholds, f"calibrated_{level}")
            absolute = getattr(thresholds, f"force_std_{level}")
            out.append(absolute if multiple is None else multiple * float(quantiles[k]))
        return out[0], out[1]

    return pair


def resolve_for_calculator(thresholds: Thresholds, calc, *, source: str | None = None) -> Thresholds:
    """``thresholds`` resolved (:meth:`Thresholds.resolve`) for a calculator's model: its
    ``reference`` (set by :meth:`~blip_ase.calculator.BLIPCalculator.from_checkpoint`) and the
    elements of its ``model``. Returns ``thresholds`` unchanged when nothing is calibrated."""
    if not thresholds.calibrated:
        return thresholds
    model = getattr(calc, "model", None)
    symbols = [chemical_symbols[int(z)] for z in getattr(model, "elements", ())]
    where = source or f"the model of the {type(calc).__name__}"
    return thresholds.resolve(getattr(calc, "reference", None), symbols, source=where)


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
