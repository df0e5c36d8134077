"""``MDConfig``: everything an uncertainty-monitored run needs, and its round trip through JSON.

The run stores its configuration in ``summary.json`` (``"config"``, with the thresholds); a
restart rebuilds the run from it (:mod:`blip_ase.md.restart`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from blip_ase.configuration import checked_int, from_dict
from blip_ase.md import dynamics as d
from blip_ase.md.physics import PhysicalChecks
from blip_ase.md.policy import Thresholds
from blip_ase.md.schedule import MAX_INTERVAL_FACTOR, QUIET_RATIO, CheckSchedule


@dataclass(frozen=True)
class MDConfig:
    """Everything :func:`~blip_ase.md.run.run_md` needs; ``blip md`` options map one to one onto
    these fields and take their defaults from here.

    Attributes:
        model: checkpoint path; None = the shipped ammonia model (:mod:`blip_ase.assets`).
        structure: starting structure, any file ``ase.io.read`` understands (first frame;
            ``FILE@INDEX`` picks another, e.g. ``md_out/md.traj@-1``); None = the shipped NH3.
        out: output directory.
        ensemble: see :func:`~blip_ase.md.dynamics.make_dynamics`.
        steps: total number of MD steps (on restart: the total including the steps already run).
        timestep_fs, temperature_K, pressure_bar, friction_per_fs, tdamp_fs, pdamp_fs,
            compressibility_per_bar: see :func:`~blip_ase.md.dynamics.make_dynamics`.
        init_temperature_K: temperature of the initial Maxwell-Boltzmann velocities (None = the
            thermostat's ``temperature_K``).
        seed: seeds the velocities, the stochastic thermostat and the Monte Carlo noise.
        n_samples: Monte Carlo samples per uncertainty check.
        uq_interval: steps between uncertainty checks (near the thresholds, with ``uq_max_interval``).
        uq_max_interval: adaptive checks (:class:`~blip_ase.md.schedule.CheckSchedule`): after a
            check far below the flag threshold the gap to the next doubles, up to this many steps;
            back to ``uq_interval`` after any other. None: 4 x ``uq_interval``; ``uq_interval``:
            a fixed schedule.
        uq_quiet_ratio: a check is far below the flag threshold when every atom's force std (or the
            screen's bound on it) is below this fraction of the atom's limit.
        screen: let the model's uncertainty screen (``blip calibrate`` fits one; see
            :mod:`blip_ase.inference.screen`) clear a check without Monte Carlo samples when its
            bound on every atom's force std is below the atom's flag threshold (halt where no
            flag is set); anything else, and every frame the physical checks object to, is
            checked with samples. Off for models without a screen and for runs with relative or
            energy thresholds, which need samples.
        screen_anchor_steps: for this many steps after a check with samples, the screen's
            estimate of an atom is also ``1.5 x`` that check's measured std times the change of
            the screen's bound since (:meth:`~blip_ase.md.tracker.Tracker.screen`); 0: the bound alone.
        traj_interval: steps between trajectory/log frames.
        thresholds: flag/halt policy (default: none; ``blip md``'s are :data:`~blip_ase.md.DEFAULT_THRESHOLDS`,
            in calibrated units, resolved to eV/A when the run loads its model).
        physical: the physical checks (fragmentation, atoms too close, temperature runaway,
            energy jump; :class:`~blip_ase.md.physics.PhysicalChecks`); a mapping of its fields
            is converted (JSON; ``{"enabled": false}`` switches every check off, as None does
            in Python).
        device: torch device (None: CUDA if available, else CPU).
        overwrite: replace the outputs of an earlier run in ``out``.
        restart: continue the run in ``out`` from the last frame of ``md.traj`` with the stored
            configuration (see :mod:`blip_ase.md.restart` for what may change).
        progress: show a progress bar (stderr).
        plot: write ``uncertainty.png``.
        summary_every_s: minimum seconds between rewrites of ``summary.json`` during the run.

    Raises:
        ValueError: an unknown ensemble, a count below its minimum, a non-positive time step or
            time constant, a negative temperature, or ``overwrite`` with ``restart``.
    """

    model: str | None = None
    structure: str | None = None
    out: str = "md_out"
    ensemble: d.Ensemble = d.DEFAULT_ENSEMBLE
    steps: int = 2000
    timestep_fs: float = d.DEFAULT_TIMESTEP_FS
    temperature_K: float = d.DEFAULT_TEMPERATURE_K
    pressure_bar: float = d.DEFAULT_PRESSURE_BAR
    friction_per_fs: float = d.DEFAULT_FRICTION_PER_FS
    tdamp_fs: float = d.DEFAULT_TDAMP_FS
    pdamp_fs: float = d.DEFAULT_PDAMP_FS
    compressibility_per_bar: float = d.DEFAULT_COMPRESSIBILITY_PER_BAR
    init_temperature_K: float | None = None
    seed: int = 0
    n_samples: int = 16
    uq_interval: int = 10
    uq_max_interval: int | None = None
    uq_quiet_ratio: float = QUIET_RATIO
    screen: bool = True
    screen_anchor_steps: int = 0
    traj_interval: int = 10
    thresholds: Thresholds = field(default_factory=Thresholds)
    physical: PhysicalChecks = field(default_factory=PhysicalChecks)
    device: str | None = None
    overwrite: bool = False
    restart: bool = False
    progress: bool = False
    plot: bool = True
    summary_every_s: float = 2.0

    def __post_init__(self):
        object.__setattr__(self, "physical", PhysicalChecks.from_value(self.physical))
        if self.ensemble not in d.ENSEMBLES:
            raise ValueError(f"unknown ensemble {self.ensemble!r}; choose one of {', '.join(d.ENSEMBLES)}")
        for name, least in (("steps", 0), ("n_samples", 2), ("uq_interval", 1), ("traj_interval", 1),
                            ("screen_anchor_steps", 0)):
            checked_int(getattr(self, name), least=least, name=name)  # n_samples: a variance needs two
        self.schedule()  # checks uq_max_interval and uq_quiet_ratio
        if self.overwrite and self.restart:
            raise ValueError("overwrite and restart exclude each other")
        d.check_settings(
            timestep_fs=self.timestep_fs,
            temperature_K=self.temperature_K,
            tdamp_fs=self.tdamp_fs,
            pdamp_fs=self.pdamp_fs,
        )
        if self.init_temperature_K is not None and not self.init_temperature_K >= 0:
            raise ValueError(f"init_temperature_K must be >= 0, got {self.init_temperature_K!r}")

    def schedule(self) -> CheckSchedule:
        """A fresh :class:`~blip_ase.md.schedule.CheckSchedule` of these settings."""
        largest = MAX_INTERVAL_FACTOR * self.uq_interval if self.uq_max_interval is None else self.uq_max_interval
        return CheckSchedule(self.uq_interval, largest, quiet=self.uq_quiet_ratio)

    def to_dict(self) -> dict:
        """JSON-ready fields (thresholds as :meth:`Thresholds.to_dict`)."""
        out = asdict(self)
        out["thresholds"] = self.thresholds.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MDConfig:
        """Inverse of :meth:`to_dict` (``thresholds`` as a mapping, ``per_element`` pairs as lists).

        Raises:
            ValueError: an unknown key (the message lists the allowed ones) or a bad value, named
                (see :func:`blip_ase.configuration.from_dict`).
        """
        return from_dict(cls, data, where="")
