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
           thresholds: {calibrated_flag: 1.4, calibrated_halt: 5.6}}   # the default; eV/A: force_std_flag
    select: {strategy: fps, budget: 16, min_distance: 0.01}
    oracle: {kind: pyscf, method: b3lyp, basis: 6-31g*, executor: processes}
    train: {val_fraction: 0.2, config: {epochs: 100}}
    stop: {max_rounds: 5, max_labels: 200, max_flagged_fraction: 0.05}

Every section is a frozen dataclass that checks its own fields when built (``ValueError`` naming
the setting as ``section.field``), so a config built in Python is checked exactly like one read
from YAML by :func:`~blip_ase.training.config.from_dict`. Three fields stay mappings because
their keys belong to someone else: ``explore.md`` (fields of :class:`~blip_ase.md.MDConfig`,
checked by building it), ``oracle.kwargs`` (the calculator's constructor) and ``train.config``
(overrides of the checkpoint's training configuration, checked against it before any work).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from blip_ase.md import DEFAULT_THRESHOLDS, MDConfig, Thresholds

# MDConfig fields the loop sets itself (explore.md may not)
LOOP_MD_FIELDS = ("model", "structure", "out", "temperature_K", "overwrite", "restart", "progress", "seed")


def is_integer(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A finite int or float (not a bool, a string or a NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_integer(name: str, value, least: int | None = None) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an integer (``>= least``)."""
    if not is_integer(value) or (least is not None and value < least):
        raise ValueError(f"{name} must be an integer" + ("" if least is None else f" >= {least}") + f", got {value!r}")


def require_mapping(name: str, value) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping, got {value!r}")


@dataclass(frozen=True)
class ExploreConfig:
    """Uncertainty-monitored MD of each round: one walker per (structure, temperature).

    Attributes:
        structures: start structures (``FILE`` or ``FILE@INDEX``, as ``blip md --structure``).
        temperatures_K: thermostat temperatures; every structure runs at every temperature.
        steps: MD steps per walker.
        md: other :class:`~blip_ase.md.MDConfig` fields (ensemble, timestep_fs, uq_interval,
            n_samples, ...; ``thresholds`` as a mapping of :class:`~blip_ase.md.Thresholds`
            fields with at least one flag threshold; without ``thresholds``:
            :data:`~blip_ase.md.DEFAULT_THRESHOLDS`, in calibrated units). Thresholds in
            calibrated units (``calibrated_flag``, ``calibrated_halt``: multiples of the
            per-element force-error quantiles ``blip calibrate`` stores) are resolved against
            each round's own model, so they follow its recalibration.
        engine: ``walkers``: all walkers of a round as one batch (``blip md --walkers``, torch-sim;
            ensembles ``nve`` and ``nvt-langevin``; an interrupted batch is run again whole);
            ``serial``: one ``blip md`` run after another (any ensemble; an interrupted walker
            resumes alone); ``auto``: ``walkers`` when the ensemble allows it and there are at
            least two walkers, else ``serial``.
    """

    structures: tuple[str, ...] = ()
    temperatures_K: tuple[float, ...] = (300.0,)
    steps: int = 1000
    md: dict = field(default_factory=dict)
    engine: Literal["auto", "walkers", "serial"] = "auto"

    def __post_init__(self):
        for name in ("structures", "temperatures_K"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"explore.{name} must list at least one entry, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not all(isinstance(spec, str) and spec for spec in self.structures):
            raise ValueError(f"explore.structures must list structure files, got {list(self.structures)!r}")
        for T in self.temperatures_K:
            if not (is_finite_number(T) and T >= 0):
                raise ValueError(f"explore.temperatures_K must list finite temperatures >= 0 K, got {T!r}")
        require_integer("explore.steps", self.steps, 1)
        require_mapping("explore.md", self.md)
        if self.engine not in ("auto", "walkers", "serial"):
            raise ValueError(f"explore.engine must be one of ['auto', 'walkers', 'serial'], got {self.engine!r}")
        set_by_loop = sorted(set(self.md) & set(LOOP_MD_FIELDS))
        if set_by_loop:
            raise ValueError(
                f"explore.md may not set {set_by_loop}: the loop sets them "
                "(temperatures: explore.temperatures_K, seed: the top-level seed)"
            )
        try:
            for T in self.temperatures_K:
                md = self.md_config(temperature_K=T)  # raises for unknown keys and bad values
        except ValueError as exc:
            raise ValueError(f"explore.md: {exc}") from None
        th = md.thresholds
        flags = (th.force_std_flag, th.calibrated_flag, th.relative_flag, th.energy_std_flag)
        if all(flag is None for flag in flags) and not th.per_element:
            raise ValueError(
                "explore.md.thresholds needs a flag threshold (e.g. calibrated_flag: 1.4, or force_std_flag: 0.25 eV/A)"
            )

    @property
    def walkers(self) -> list[tuple[str, float]]:
        """(structure, temperature) of walker ``w``, structures outermost."""
        return [(s, T) for s in self.structures for T in self.temperatures_K]

    def md_config(self, **loop_fields) -> MDConfig:
        """The :class:`MDConfig` of one walker: ``md`` (its thresholds by default
        :data:`~blip_ase.md.DEFAULT_THRESHOLDS`) plus the fields the loop sets."""
        md = {"thresholds": DEFAULT_THRESHOLDS.to_dict(), **self.md}
        return MDConfig.from_dict({**md, "steps": self.steps, "plot": False, **loop_fields})

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
            model's mean-pooled per-atom descriptors); a frame closer than this to a chosen or an
            already labelled frame is dropped.
        descriptor: what FPS compares: ``mean`` (mean-pooled per-atom descriptors of each frame)
            or ``atoms`` (each atom against the nearest atom of its element: a frame is as far
            from the labelled data as its most novel atom); ``max_variance`` uses ``mean``.
        seed: of the ``random`` strategy.
    """

    strategy: Literal["fps", "max_variance", "random"] = "fps"
    descriptor: Literal["mean", "atoms"] = "mean"
    budget: int = 16
    min_distance: float = 0.01
    seed: int = 0

    def __post_init__(self):
        require_integer("select.budget", self.budget, 1)
        require_integer("select.seed", self.seed)
        if self.descriptor not in ("mean", "atoms"):
            raise ValueError(f"select.descriptor must be mean or atoms, got {self.descriptor!r}")
        if not (is_finite_number(self.min_distance) and self.min_distance >= 0):
            raise ValueError(f"select.min_distance must be a finite number >= 0, got {self.min_distance!r}")


@dataclass(frozen=True)
class OracleConfig:
    """Who labels the selected frames, and where.

    Attributes:
        kind: ``pyscf`` (molecular HF/DFT), ``ase`` (any ASE calculator) or ``external`` (files:
            ``round_<k>/to_label.extxyz`` is written and ``blip learn --restart`` reads
            ``round_<k>/labelled.extxyz``).
        method: PySCF method: ``hf`` or an exchange-correlation functional (``b3lyp``, ``b88,p86``).
        basis: PySCF basis set (``sto-3g``, ``6-31g*``, ``def2-svp``).
        charge, spin: PySCF molecular charge and 2S (restricted for spin 0, unrestricted otherwise).
        max_cycle: SCF iterations; an unconverged SCF is a recorded failure.
        calculator: ``module:Class`` of the ASE calculator (kind ``ase``); built once per worker.
        kwargs: keyword arguments of that class.
        workers: parallel labelling processes, one thread each (None: the machine's cores; with
            ``executor: dask`` and no ``dask_address``: the workers of the local cluster).
        executor: ``processes`` (local worker processes that die with the loop) or ``dask``
            (a Dask ``distributed`` cluster: ``pip install "blip-ase[cluster]"``; reach SLURM or
            PBS through ``dask-jobqueue``, see ``docs/learn-cluster.md``).
        dask_address: scheduler address of a running Dask cluster (``tcp://host:8786``); None:
            a ``LocalCluster`` of ``workers`` processes for the labelling.
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
    executor: Literal["processes", "dask"] = "processes"
    dask_address: str | None = None

    def __post_init__(self):
        require_integer("oracle.charge", self.charge)
        require_integer("oracle.spin", self.spin)
        require_integer("oracle.max_cycle", self.max_cycle, 1)
        if self.workers is not None:
            require_integer("oracle.workers", self.workers, 1)
        require_mapping("oracle.kwargs", self.kwargs)
        if self.kind == "ase" and (not isinstance(self.calculator, str) or ":" not in self.calculator):
            raise ValueError(f"oracle.calculator must be 'module:Class' for kind 'ase', got {self.calculator!r}")
        if self.executor not in ("processes", "dask"):
            raise ValueError(f"oracle.executor must be one of ['processes', 'dask'], got {self.executor!r}")
        if self.dask_address is not None and (self.executor != "dask" or not isinstance(self.dask_address, str)):
            raise ValueError(f"oracle.dask_address needs executor: dask and a string, got {self.dask_address!r}")

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
        power: calibrate with the power-law map of the force variances (``blip calibrate
            --power``): once the validation set mixes near-equilibrium frames and hot labels,
            one scale fitted on both inflates the uncertainty near equilibrium.
        calibration_samples: Monte Carlo samples of the calibration and the test metrics.
    """

    config: dict = field(default_factory=dict)
    val_fraction: float = 0.2
    calibrate: bool = True
    power: bool = False
    calibration_samples: int = 32

    def __post_init__(self):
        require_mapping("train.config", self.config)
        if not (is_finite_number(self.val_fraction) and 0 <= self.val_fraction < 1):
            raise ValueError(f"train.val_fraction must be a number in [0, 1), got {self.val_fraction!r}")
        for name in ("calibrate", "power"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        require_integer("train.calibration_samples", self.calibration_samples, 2)


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

    def __post_init__(self):
        require_integer("stop.max_rounds", self.max_rounds, 1)
        if self.max_labels is not None:
            require_integer("stop.max_labels", self.max_labels, 1)
        mff = self.max_flagged_fraction
        if mff is not None and not (is_finite_number(mff) and 0 <= mff <= 1):
            raise ValueError(f"stop.max_flagged_fraction must be a number in [0, 1], got {mff!r}")


SECTIONS = {"explore": ExploreConfig, "select": SelectConfig, "oracle": OracleConfig, "train": FineTuneConfig,
            "stop": StopConfig}  # fmt: skip


@dataclass(frozen=True)
class LearnConfig:
    """Everything ``blip learn`` needs (see the module docstring for an example).

    Attributes:
        model: starting BLIP checkpoint. train_data, val_data: its labelled training and
            validation data (any format of ``blip train``), kept in every fine-tune.
        test_data: optional labelled test set; its force MAE is reported every round.
        seed: of the MD walkers (round ``k``, walker ``w``: ``seed + 1000 k + w``) and the splits.
        explore, select, oracle, train, stop: the sections (:class:`ExploreConfig`, ...).
    """

    model: str = ""
    train_data: str = ""
    val_data: str = ""
    test_data: str | None = None
    seed: int = 0
    explore: ExploreConfig = field(default_factory=ExploreConfig)  # a missing section: its error
    select: SelectConfig = field(default_factory=SelectConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    train: FineTuneConfig = field(default_factory=FineTuneConfig)
    stop: StopConfig = field(default_factory=StopConfig)

    def __post_init__(self):
        for name in ("model", "train_data", "val_data"):
            if not getattr(self, name):
                raise ValueError(f"the learn config needs {name!r}")
        require_integer("seed", self.seed)
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a mapping of {cls.__name__} fields, got {getattr(self, name)!r}")
        if self.explore.thresholds().calibrated and not self.train.calibrate:
            raise ValueError(
                "explore.md.thresholds are in calibrated units (the default), which each round resolves against its "
                "model's calibration, but train.calibrate is false: the fine-tuned models would have none; set "
                "train.calibrate: true or give absolute thresholds (force_std_flag, force_std_halt in eV/A)"
            )

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists): what ``state.json`` stores and :meth:`from_stored` reads."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_stored(cls, data: dict) -> LearnConfig:
        """Inverse of :meth:`to_dict` (the config stored in a run directory)."""
        from blip_ase.training.config import from_dict

        return from_dict(cls, data, where="the stored learn config")


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
