"""Dynamics factory: NVE, NVT and NPT integrators of ASE >= 3.29 from unit-named arguments.

:func:`make_dynamics` builds the integrator, :func:`check_ensemble` refuses a run that cannot
work, :func:`thermalize` draws the initial velocities. The ``DEFAULT_*`` constants are the one
home of the MD defaults (``make_dynamics``, :class:`~blip_ase.md.config.MDConfig` and ``blip md``
all read them). The monitored run itself is :func:`blip_ase.md.run.run_md`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from ase import Atoms, units

Ensemble = Literal[
    "nve", "nvt-langevin", "nvt-bussi", "nvt-nose-hoover", "npt-mtk-isotropic", "npt-mtk", "npt-berendsen"
]
ENSEMBLES: tuple[str, ...] = Ensemble.__args__
NPT_ENSEMBLES = ("npt-mtk-isotropic", "npt-mtk", "npt-berendsen")
DEFAULT_ENSEMBLE = "nvt-langevin"
DEFAULT_TIMESTEP_FS = 0.5
DEFAULT_TEMPERATURE_K = 300.0
DEFAULT_PRESSURE_BAR = 1.0
DEFAULT_FRICTION_PER_FS = 0.01
DEFAULT_TDAMP_FS = 50.0
DEFAULT_PDAMP_FS = 500.0
DEFAULT_COMPRESSIBILITY_PER_BAR = 4.57e-5
DYNAMICS_KEYS = (  # the keyword arguments of make_dynamics that MDConfig carries under the same names
    "timestep_fs",
    "temperature_K",
    "pressure_bar",
    "friction_per_fs",
    "tdamp_fs",
    "pdamp_fs",
    "compressibility_per_bar",
)
if TYPE_CHECKING:
    from ase.md.md import MolecularDynamics


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


def check_settings(*, timestep_fs: float, temperature_K: float, tdamp_fs: float, pdamp_fs: float) -> None:
    """Raise ``ValueError`` for a non-positive time step or time constant or a negative temperature."""
    for name, value in (("timestep_fs", timestep_fs), ("tdamp_fs", tdamp_fs), ("pdamp_fs", pdamp_fs)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if not temperature_K >= 0:
        raise ValueError(f"temperature_K must be >= 0, got {temperature_K!r}")


def make_dynamics(
    atoms: Atoms,
    ensemble: Ensemble = DEFAULT_ENSEMBLE,
    *,
    timestep_fs: float = DEFAULT_TIMESTEP_FS,
    temperature_K: float = DEFAULT_TEMPERATURE_K,
    pressure_bar: float = DEFAULT_PRESSURE_BAR,
    friction_per_fs: float = DEFAULT_FRICTION_PER_FS,
    tdamp_fs: float = DEFAULT_TDAMP_FS,
    pdamp_fs: float = DEFAULT_PDAMP_FS,
    compressibility_per_bar: float = DEFAULT_COMPRESSIBILITY_PER_BAR,
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
    check_settings(timestep_fs=timestep_fs, temperature_K=temperature_K, tdamp_fs=tdamp_fs, pdamp_fs=pdamp_fs)
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
    from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT, NoseHooverChainNVT
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


