"""``LearnConfig``: the YAML of ``blip learn``, as frozen dataclasses that reject unknown keys.

Relative paths in the file are relative to the file's directory. Example::

    model: start/model.pt            # the BLIP checkpoint the loop starts from
    train_data: start/train.extxyz   # its training data (kept in every fine-tune)
    val_data: start/val.extxyz       # its validation data (grows by each round's held-out labels)
    test_data: ood.extxyz            # optional: labelled test set reported every round
    explore:
      structures: [start/nh3.xyz]
      temperatures_K: [1000]
      steps: 2000
      md: {timestep_fs: 0.5, uq_interval: 10, n_samples: 16,
           thresholds: {force_std_flag: 0.25, force_std_halt: 1.0}}
    select: {strategy: fps, budget: 16, min_distance: 0.01}
    oracle: {kind: pyscf, method: b3lyp, basis: 6-31g*}
    train: {val_fraction: 0.2, config: {epochs: 100}}
    stop: {max_rounds: 5, max_labels: 200, max_flagged_fraction: 0.05}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from blip_ase.md.config import MDConfig
from blip_ase.md.monitor import Thresholds

# MDConfig fields the loop sets itself (explore.md may not)
LOOP_MD_FIELDS = ("model", "structure", "out", "temperature_K", "overwrite", "restart", "progress", "seed")


@dataclass(frozen=True)
class ExploreConfig:
    """Uncertainty-monitored MD of each round: one walker per (structure, temperature).

    Attributes:
        structures: start structures (``FILE`` or ``FILE@INDEX``, as ``blip md --structure``).
        temperatures_K: thermostat temperatures; every structure runs at every temperature.
        steps: MD steps per walker.
        md: other :class:`~blip_ase.md.MDConfig` fields (ensemble, timestep_fs, uq_interval,
            n_samples, ...; ``thresholds`` as a mapping of :class:`~blip_ase.md.Thresholds`
            fields; at least one flag threshold is required: the models differ too much for a default).
    """

    structures: list[str] = field(default_factory=list)
    temperatures_K: list[float] = field(default_factory=lambda: [300.0])
    steps: int = 1000
    md: dict = field(default_factory=dict)

    def md_config(self, **loop_fields) -> MDConfig:
        """The :class:`MDConfig` of one walker: ``md`` plus the fields the loop sets."""
        return MDConfig.from_dict({**self.md, "steps": self.steps, "plot": False, **loop_fields})

    def thresholds(self) -> Thresholds:
        return self.md_config().thresholds


@dataclass(frozen=True)
class SelectConfig:
    """Choice of the frames to label from the flagged pool.

    Attributes:
        strategy: ``fps`` (uncertainty-weighted farthest-point sampling), ``max_variance``
            (highest uncertainty first) or ``random`` (uniform, for comparison; no duplicate filter).
        budget: at most this many frames per round (>= 1).
        min_distance: near-duplicate threshold on the descriptor distance (RMS difference of the
            model's mean-pooled node features); a frame closer than this to a chosen or an already
            labelled frame is dropped.
        seed: of the ``random`` strategy.
    """

    strategy: Literal["fps", "max_variance", "random"] = "fps"
    budget: int = 16
    min_distance: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class OracleConfig:
    """Who labels the selected frames.

    Attributes:
        kind: ``pyscf`` (molecular HF/DFT), ``ase`` (any ASE calculator) or ``external`` (files:
            ``round_<k>/to_label.extxyz`` is written and ``blip learn --restart`` reads
            ``round_<k>/labelled.extxyz``).
        method: PySCF method: ``hf`` or an exchange-correlation functional (``b3lyp``, ``b88,p86``).
        basis: PySCF basis set (``sto-3g``, ``6-31g*``, ``def2-svp``).
        charge, spin: PySCF molecular charge and 2S (restricted for spin 0, unrestricted otherwise).
        max_cycle: SCF iterations; an unconverged SCF is a recorded failure.
        calculator: ``module:Class`` of the ASE calculator (kind ``ase``).
        kwargs: keyword arguments of that class.
        workers: parallel labelling processes, one thread each (None: the machine's cores).
    """

    kind: Literal["pyscf", "ase", "external"] = "pyscf"
    method: str = "hf"
    basis: str = "sto-3g"
    charge: int = 0
    spin: int = 0
    max_cycle: int = 100
    calculator: str | None = None
    kwargs: dict = field(default_factory=dict)
    workers: int | None = None

    @property
    def name(self) -> str:
        """Provenance written with every label, e.g. ``pyscf:b3lyp/6-31g*``."""
        if self.kind == "pyscf":
            return f"pyscf:{self.method}/{self.basis}"
        return f"ase:{self.calculator}" if self.kind == "ase" else "external"


@dataclass(frozen=True)
class FineTuneConfig:
    """Fine-tuning of each round (from the current checkpoint, on all data so far).

    Attributes:
        config: overrides of the checkpoint's own :class:`~blip_ase.training.TrainConfig` (its
            stored training configuration), e.g. ``{epochs: 100, optim: {lr: 3.0e-4}}``.
        val_fraction: share of each round's labels kept for validation and calibration.
        calibrate: refit the variance scale on the validation data (``blip calibrate``).
        calibration_samples: Monte Carlo samples of the calibration and the test metrics.
    """

    config: dict = field(default_factory=dict)
    val_fraction: float = 0.2
    calibrate: bool = True
    calibration_samples: int = 32


@dataclass(frozen=True)
class StopConfig:
    """When the loop ends.

    Attributes:
        max_rounds: rounds of labelling and fine-tuning; a last exploration tests the final model.
        max_labels: total oracle calls (failures count); None = no limit.
        max_flagged_fraction: the exploration converges only with at most this fraction of its
            checks flagged (besides running every step without a halt); None = halts only.
    """

    max_rounds: int = 5
    max_labels: int | None = None
    max_flagged_fraction: float | None = None


@dataclass(frozen=True)
class LearnConfig:
    """Everything ``blip learn`` needs (see the module docstring for an example).

    Attributes:
        model: starting BLIP checkpoint. train_data, val_data: its labelled training and
            validation data (any format of ``blip train``), kept in every fine-tune.
        test_data: optional labelled test set; its force MAE is reported every round.
        seed: of the MD walkers (round ``k``, walker ``w``: ``seed + 1000 k + w``) and the splits.
    """

    model: str = ""
    train_data: str = ""
    val_data: str = ""
    test_data: str | None = None
    seed: int = 0
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    train: FineTuneConfig = field(default_factory=FineTuneConfig)
    stop: StopConfig = field(default_factory=StopConfig)

    def __post_init__(self):
        _check(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (not a bool, a string or a NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(cfg: LearnConfig) -> None:
    """Raise ``ValueError`` naming the first invalid setting."""
    for name in ("model", "train_data", "val_data"):
        if not getattr(cfg, name):
            raise ValueError(f"the learn config needs {name!r}")
    e, s, o, t, st = cfg.explore, cfg.select, cfg.oracle, cfg.train, cfg.stop
    for name, value in (("explore.structures", e.structures), ("explore.temperatures_K", e.temperatures_K)):
        if not isinstance(value, list) or not value:
            raise ValueError(f"{name} must list at least one entry, got {value!r}")
    if not all(isinstance(spec, str) and spec for spec in e.structures):
        raise ValueError(f"explore.structures must list structure files, got {e.structures!r}")
    for T in e.temperatures_K:
        if not (_is_number(T) and T >= 0):
            raise ValueError(f"explore.temperatures_K must list finite temperatures >= 0 K, got {T!r}")
    for name, value in (("explore.md", e.md), ("oracle.kwargs", o.kwargs), ("train.config", t.config)):
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
    for name, value in (("seed", cfg.seed), ("select.seed", s.seed), ("oracle.charge", o.charge),
                        ("oracle.spin", o.spin)):
        if not _is_int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    checks = [
        ("explore.steps", e.steps, 1), ("select.budget", s.budget, 1), ("stop.max_rounds", st.max_rounds, 1),
        ("train.calibration_samples", t.calibration_samples, 2), ("oracle.max_cycle", o.max_cycle, 1),
    ]
    checks += [("stop.max_labels", st.max_labels, 1)] if st.max_labels is not None else []
    checks += [("oracle.workers", o.workers, 1)] if o.workers is not None else []
    for name, value, least in checks:
        if not _is_int(value) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not (_is_number(s.min_distance) and s.min_distance >= 0):
        raise ValueError(f"select.min_distance must be a finite number >= 0, got {s.min_distance!r}")
    if not (_is_number(t.val_fraction) and 0 <= t.val_fraction < 1):
        raise ValueError(f"train.val_fraction must be a number in [0, 1), got {t.val_fraction!r}")
    if not isinstance(t.calibrate, bool):
        raise ValueError(f"train.calibrate must be true or false, got {t.calibrate!r}")
    mff = st.max_flagged_fraction
    if mff is not None and not (_is_number(mff) and 0 <= mff <= 1):
        raise ValueError(f"stop.max_flagged_fraction must be a number in [0, 1], got {mff!r}")
    if o.kind == "ase" and (not isinstance(o.calculator, str) or ":" not in o.calculator):
        raise ValueError(f"oracle.calculator must be 'module:Class' for kind 'ase', got {o.calculator!r}")
    set_by_loop = sorted(set(e.md) & set(LOOP_MD_FIELDS))
    if set_by_loop:
        raise ValueError(
            f"explore.md may not set {set_by_loop}: the loop sets them "
            "(temperatures: explore.temperatures_K, seed: the top-level seed)"
        )
    try:
        for T in e.temperatures_K:
            md = e.md_config(temperature_K=T)  # raises for unknown keys and bad values
    except ValueError as exc:
        raise ValueError(f"explore.md: {exc}") from None
    th = md.thresholds
    if th.force_std_flag is None and th.relative_flag is None and th.energy_std_flag is None and not th.per_element:
        raise ValueError("explore.md.thresholds needs a flag threshold (e.g. force_std_flag: 0.25 eV/A)")


def load_learn_config(path: str | Path) -> LearnConfig:
    """Read a ``blip learn`` YAML file; relative paths become relative to its directory.

    Raises:
        FileNotFoundError: no such file. ValueError: unknown keys or invalid values (named).
    """
    import yaml

    from blip_ase.training.config import from_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping")
    base = path.resolve().parent

    def resolve(p: str | None) -> str | None:
        return None if p is None else str(base / p) if not Path(str(p).rpartition("@")[0] or p).is_absolute() else p

    for key in ("model", "train_data", "val_data", "test_data"):
        if data.get(key) is not None:
            data[key] = resolve(str(data[key]))
    explore = data.get("explore")
    if isinstance(explore, dict) and isinstance(explore.get("structures"), list):
        explore["structures"] = [resolve(str(s)) for s in explore["structures"]]
    return from_dict(LearnConfig, data, where=str(path))
