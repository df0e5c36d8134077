"""BLIPCalculator: an ASE calculator with calibrated Monte Carlo uncertainty.

Results (units eV, Angstrom; ASE Voigt order xx yy zz yz xz xy for stress, eV/A^3):

- ``energy``, ``free_energy``: float, MC mean (``mode="mc"``) or MAP value.
- ``forces``: ``(n, 3)``; never squeezed, also for one atom.
- ``stress``: ``(6,)``, periodic cells (``pbc`` all True) only.
- ``energy_variance``: float, eV^2, unbiased (ddof=1) over the S samples, times calibration.
- ``forces_variance``: ``(n,)`` eV^2/A^2, per atom, sum of the three component variances
  (trace of the atom's force covariance), times calibration.
- ``stress_variance``: ``(6,)`` (eV/A^3)^2, periodic cells only.
- ``energy_samples``, ``forces_samples``: ``(S,)``, ``(S, n, 3)``, with ``keep_samples=True``.

A deterministic model with LLPR data (``blip llpr``) gives in ``mode="mc"`` its MAP results and
closed-form variances (:mod:`blip_ase.inference.llpr`): no samples, so ``n_samples`` and ``seed``
change nothing and no sample keys are returned.

Variance and sample keys exist in MC mode only: in MAP mode (and ``stress`` for a cell that is
not periodic in all three directions) the key is absent and ``get_property`` raises ASE's
``PropertyNotImplementedError``. :meth:`BLIPCalculator.monte_carlo` returns the MC keys for the
current configuration whatever the mode, e.g. every k steps of MAP-driven dynamics.

The calculator is a thin ASE adapter: ASE's ``check_state`` and results cache decide when to
compute; the :class:`~blip_ase.inference.engine.MonteCarloEngine` (:attr:`BLIPCalculator.engine`)
computes: graph cache, batched samples, noise, statistics and calibration.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from blip_ase.devices import resolve_device
from blip_ase.inference.engine import MonteCarloEngine, checked_samples
from blip_ase.inference.screen import Screen
from blip_ase.models.checkpoint import load_checkpoint
from blip_ase.models.potential import Potential

Mode = Literal["mc", "map"]


class BLIPCalculator(Calculator):
    """ASE calculator for a (Bayesian) learned interatomic potential.

    Every ``calculate`` computes all properties in one pass (one batched forward and one
    backward over the S samples, chunked so that ``chunk * n_atoms <= max_batch_atoms``);
    ``atoms`` is never modified. The engine caches the neighbour list and alpha/beta of the last
    configuration, so MAP forces and the MC uncertainty of the same configuration share them.

    Args:
        model: a backend :class:`~blip_ase.models.potential.Potential`; it is moved in place to
            ``device``/``dtype`` and put in eval mode.
        n_samples: Monte Carlo samples S per MC evaluation (>= 2).
        mode: ``"mc"`` (mean and variances over S samples) or ``"map"`` (one deterministic pass
            with the mean weights; no variance keys).
        device: torch device; None picks CUDA when available, else CPU.
        dtype: ``"float32"``, ``"float64"`` (or a torch dtype); None keeps the model's.
        seed: seeds the engine's ``torch.Generator``; every MC evaluation draws S per-sample
            generators from it, so the same seed gives the same sequence of results. None:
            nondeterministic.
        keep_samples: also return ``energy_samples (S,)`` eV and ``forces_samples (S, n, 3)`` eV/A.
        max_batch_atoms: bound on atoms per batched pass (at least one sample per pass); bounds
            memory. None: the engine's default for the device
            (:data:`~blip_ase.inference.engine.DEFAULT_MAX_BATCH_ATOMS`).
        calibration: variance scale factors ``{"energy", "forces", "stress"}``; missing keys are
            1.0. Optional isotonic maps ``"<key>_isotonic": {"x": [...], "y": [...]}`` (from
            ``blip calibrate --isotonic``) multiply the variance further by the second moment
            of the recalibrated standardised error (:mod:`blip_ase.inference.calibration`).
            An optional ``"forces_power": {"gamma", "reference"}`` (``blip calibrate --power``)
            maps the per-atom force variance ``v`` to ``reference * (v / reference) ** gamma``
            before the scale; with ``"delta"`` and ``"structure_reference"`` (``--power
            --structure``) also times ``(m / structure_reference) ** delta``, ``m`` the mean of
            the structure's ``v``. :meth:`from_checkpoint` takes them from the checkpoint unless given here.

    Raises:
        ValueError: bad option, or ``mode="mc"`` with a deterministic model.
    """

    implemented_properties = [
        "energy",
        "free_energy",
        "forces",
        "stress",
        "energy_variance",
        "forces_variance",
        "stress_variance",
        "energy_samples",
        "forces_samples",
    ]

    def __init__(
        self,
        model: Potential,
        *,
        n_samples: int = 32,
        mode: Mode = "mc",
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int | None = None,
        keep_samples: bool = False,
        max_batch_atoms: int | None = None,
        calibration: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if mode not in ("mc", "map"):
            raise ValueError(f"mode must be 'mc' or 'map', got {mode!r}")
        if mode == "mc" and not model.has_uncertainty:
            raise ValueError(
                "mode='mc' needs a Bayesian model or LLPR data (blip llpr); this model is deterministic: use mode='map'"
            )
        self.n_samples = checked_samples(n_samples)
        self.mode: Mode = mode
        self.keep_samples = bool(keep_samples)
        self.engine = MonteCarloEngine(
            model, device=device, dtype=dtype, seed=seed, max_batch_atoms=max_batch_atoms, calibration=calibration
        )
        self.reference: dict | None = None  # blip calibrate's force-error quantiles (from_checkpoint sets it)

    @property
    def model(self) -> Potential:
        """The backend (on the engine's device and dtype)."""
        return self.engine.model

    @property
    def generator(self) -> torch.Generator:
        """The generator that seeds every Monte Carlo evaluation."""
        return self.engine.generator

    @property
    def max_batch_atoms(self) -> int:
        """Bound on atoms per batched pass."""
        return self.engine.max_batch_atoms

    @max_batch_atoms.setter
    def max_batch_atoms(self, value: int) -> None:
        self.engine.max_batch_atoms = value

    @property
    def calibration(self) -> Mapping[str, Any]:
        """The variance calibration in use (read-only view; assign a new dict to change it).

        Assigning validates the dict (as the constructor's ``calibration``), makes it take effect
        for the next Monte Carlo evaluation and drops the results computed with the old one.
        """
        return self.engine.calibration

    @calibration.setter
    def calibration(self, calibration: Mapping[str, Any] | None) -> None:
        self.engine.calibration = calibration
        self.results = {}

    def reset(self) -> None:
        """Forget the results and everything derived from the model: the cached neighbour list
        and alpha/beta. Call it after changing the model's weights in place."""
        super().reset()
        self.engine.clear_cache()

    @classmethod
    def from_checkpoint(cls, path: str | Path, **options: Any) -> BLIPCalculator:
        """Calculator for the model stored at ``path``; ``options`` as for the constructor.

        The checkpoint's calibration scales are used unless ``calibration=`` is given, and its
        uncertainty screen (if ``blip calibrate`` stored one) becomes the engine's. Its
        ``reference`` (the force-error quantiles ``blip calibrate`` measured, or None) becomes
        the calculator's ``reference``: what thresholds in calibrated units are resolved against
        (:meth:`blip_ase.md.policy.Thresholds.resolve`).
        """
        device = resolve_device(options.pop("device", None))
        model, ckpt = load_checkpoint(path, device=device)
        options.setdefault("calibration", ckpt.get("calibration"))
        calc = cls(model, device=device, **options)
        if ckpt.get("screen") is not None:
            calc.engine.screen = Screen.from_dict(ckpt["screen"])
        calc.reference = ckpt.get("reference")
        return calc

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """Fill ``self.results`` with every key of the mode (see the module docstring).

        ``properties`` is ignored: everything comes from one pass. When nothing changed since
        the last calculation the results are kept (so asking for a key that this mode does not
        produce never redraws the Monte Carlo samples).
        """
        if self.results and not system_changes:
            return
        Calculator.calculate(self, atoms, properties or ["energy"], system_changes)
        prepared = self.engine.prepare(self.atoms)
        if self.mode == "map":
            self.results = self.engine.map(prepared)[0]
        else:
            self.results = self.engine.monte_carlo(prepared, self.n_samples, keep_samples=self.keep_samples)[0]

    def monte_carlo(self, atoms: Atoms | None = None, n_samples: int | None = None) -> dict[str, Any]:
        """Monte Carlo statistics of ``atoms`` (default: the last calculated configuration).

        Reuses the cached neighbour list and alpha/beta when the configuration is unchanged
        (e.g. after a MAP ``calculate``); ``self.results`` is left untouched.

        Args:
            atoms: structure to evaluate; None = the configuration of the last calculation.
            n_samples: S (>= 2); None = the calculator's ``n_samples``.

        Returns:
            The MC-mode results: ``energy``, ``free_energy`` (eV), ``forces (n, 3)`` eV/A,
            ``energy_variance`` eV^2, ``forces_variance (n,)`` eV^2/A^2, for periodic cells
            ``stress (6,)`` eV/A^3 and ``stress_variance (6,)``, with ``keep_samples`` also
            ``energy_samples (S,)`` and ``forces_samples (S, n, 3)``.

        Raises:
            ValueError: the model is deterministic, or bad input (see :meth:`calculate`).
            RuntimeError: no ``atoms`` given and nothing calculated yet.
        """
        if not self.model.has_uncertainty:
            raise ValueError("monte_carlo needs a Bayesian model or LLPR data (blip llpr); this model is deterministic")
        if atoms is None:
            if self.atoms is None:
                raise RuntimeError("monte_carlo() has no configuration: pass atoms or run a calculation first")
            atoms = self.atoms
        n = self.n_samples if n_samples is None else checked_samples(n_samples)
        prepared = self.engine.prepare(atoms)
        return self.engine.monte_carlo(prepared, n, keep_samples=self.keep_samples)[0]
