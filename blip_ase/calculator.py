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

Variance and sample keys exist in MC mode only: in MAP mode (and ``stress`` for a cell that is
not periodic in all three directions) the key is absent and ``get_property`` raises ASE's
``PropertyNotImplementedError``. :meth:`BLIPCalculator.monte_carlo` returns the MC keys for the
current configuration whatever the mode, e.g. every k steps of MAP-driven dynamics.

The calculator talks to the backend contract only (:class:`~blip_ase.models.potential.Potential`,
an abstract base class; its battery is :mod:`blip_ase.testing`): ``elements``, ``is_bayesian``,
``implements_stress``, ``sample_period``, ``dtype``, ``device``, ``build_graph(atoms)`` (once per
configuration), ``coefficients(graph)`` (alpha/beta, once per configuration) and
``predict(graph, coefficients=, noise=, compute_stress=) -> {"energy": (S, 1), "forces":
(S, n, 3), "stress": (S, 1, 3, 3) = dE/d(strain) / V}``; no branch on the backend.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from blip_ase.bayes import NoiseSource
from blip_ase.data.graph import species_index, validate_atoms
from blip_ase.devices import resolve_device
from blip_ase.models.checkpoint import DEFAULT_CALIBRATION, ISOTONIC_KEYS, load_checkpoint
from blip_ase.models.potential import Potential
from blip_ase.voigt import matrix_to_voigt

Mode = Literal["mc", "map"]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class _Prepared:
    """One configuration made ready for the model: neighbour list once, alpha/beta lazily.

    ``key`` holds the configuration and the model's dtype and device: tensors built for one
    dtype/device are never reused after ``model.float()`` or ``model.to(...)``.
    """

    key: tuple
    graph: Any
    n_atoms: int
    periodic: bool
    coefficients: Any = None
    has_coefficients: bool = False


def _snapshot(atoms: Atoms, model: Potential) -> tuple:
    """What the cached tensors depend on: copies of positions, cell, pbc, numbers, and the
    model's dtype and device."""
    arrays = (atoms.positions.copy(), atoms.cell.array.copy(), atoms.pbc.copy(), atoms.numbers.copy())
    return arrays, (model.dtype, model.device)


def _same(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a[0], b[0]))


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or None to keep the model's), got {dtype!r}")
    return _DTYPES[dtype]


def _check_samples(n_samples: int) -> int:
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2 (variances are unbiased), got {n_samples!r}")
    return int(n_samples)




def _calibration(calibration: dict[str, Any] | None) -> dict[str, Any]:
    """Validated scales (floats) plus any isotonic maps (``{"x": [...], "y": [...]}``)."""
    merged = {**DEFAULT_CALIBRATION, **(calibration or {})}
    unknown = sorted(merged.keys() - DEFAULT_CALIBRATION.keys() - set(ISOTONIC_KEYS))
    if unknown:
        raise ValueError(
            f"unknown calibration keys {unknown}; known: {sorted(DEFAULT_CALIBRATION)} and {list(ISOTONIC_KEYS)}"
        )
    scales = {k: merged[k] for k in DEFAULT_CALIBRATION}
    if any(not isinstance(v, numbers.Real) or not np.isfinite(v) or v < 0 for v in scales.values()):
        raise ValueError(f"calibration scales must be finite and >= 0, got {scales}")
    result: dict[str, Any] = {k: float(v) for k, v in scales.items()}
    isotonic = [k for k in ISOTONIC_KEYS if merged.get(k) is not None]
    if isotonic:
        from blip_ase.uq.calibration import validate_isotonic

        result.update({k: validate_isotonic(k, merged[k]) for k in isotonic})
    return result


def _variance_factors(calibration: dict[str, Any]) -> dict[str, float]:
    """Variance multipliers: the scale, times the isotonic map's factor where one is stored."""
    if not any(k in calibration for k in ISOTONIC_KEYS):
        return {k: calibration[k] for k in DEFAULT_CALIBRATION}
    from blip_ase.uq.calibration import variance_factors

    return variance_factors(calibration)


class BLIPCalculator(Calculator):
    """ASE calculator for a (Bayesian) learned interatomic potential.

    Every ``calculate`` computes all properties in one pass (one batched forward and one
    backward over the S samples, chunked so that ``chunk * n_atoms <= max_batch_atoms``);
    ``atoms`` is never modified. The neighbour list and alpha/beta of the last configuration are
    cached (keyed on positions, cell, pbc and numbers), so MAP forces and the MC uncertainty of
    the same configuration share them.

    Args:
        model: a backend :class:`~blip_ase.models.potential.Potential`; it is moved in place to
            ``device``/``dtype`` and put in eval mode.
        n_samples: Monte Carlo samples S per MC evaluation (>= 2).
        mode: ``"mc"`` (mean and variances over S samples) or ``"map"`` (one deterministic pass
            with the mean weights; no variance keys).
        device: torch device; None picks CUDA when available, else CPU.
        dtype: ``"float32"``, ``"float64"`` (or a torch dtype); None keeps the model's.
        seed: seeds the calculator's ``torch.Generator``; every MC evaluation draws S per-sample
            generators from it, so the same seed gives the same sequence of results. None:
            nondeterministic.
        keep_samples: also return ``energy_samples (S,)`` eV and ``forces_samples (S, n, 3)`` eV/A.
        max_batch_atoms: bound on atoms per batched pass (at least one sample per pass); bounds
            memory (about 0.5 MB per atom for PaiNN F=64 in bcc Mo). None: 20000 on CUDA, 256 on
            CPU, where big passes are slower per atom than passes of a few hundred atoms (cache:
            S=8 samples of 250 Mo atoms took 1.54 s in passes of 4 samples, 1.23 s one by one).
        calibration: variance scale factors ``{"energy", "forces", "stress"}``; missing keys are
            1.0. Optional isotonic maps ``"<key>_isotonic": {"x": [...], "y": [...]}`` (from
            ``blip calibrate --isotonic``) multiply the variance further by the second moment
            of the recalibrated standardised error (:mod:`blip_ase.uq.calibration`); fixed at
            construction. :meth:`from_checkpoint` takes them from the checkpoint unless given here.

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
        calibration: dict[str, float] | None = None,
    ):
        super().__init__()
        if mode not in ("mc", "map"):
            raise ValueError(f"mode must be 'mc' or 'map', got {mode!r}")
        if mode == "mc" and not model.is_bayesian:
            raise ValueError("mode='mc' needs a Bayesian model; this model is deterministic: use mode='map'")
        if max_batch_atoms is not None and int(max_batch_atoms) < 1:
            raise ValueError(f"max_batch_atoms must be >= 1, got {max_batch_atoms}")
        self.n_samples = _check_samples(n_samples)
        self.mode: Mode = mode
        self.keep_samples = bool(keep_samples)
        self.calibration = calibration
        to_dtype, to_device = _resolve_dtype(dtype), resolve_device(device)
        self.model = model.to(to_device, **({"dtype": to_dtype} if to_dtype else {})).eval()
        if max_batch_atoms is None:
            max_batch_atoms = 20000 if to_device.type == "cuda" else 256
        self.max_batch_atoms = int(max_batch_atoms)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self._prepared: _Prepared | None = None

    @property
    def calibration(self) -> Mapping[str, Any]:
        """The variance calibration in use (read-only view; assign a new dict to change it).

        Assigning validates the dict (as the constructor's ``calibration``), makes it take effect
        for the next Monte Carlo evaluation and drops the results computed with the old one.
        """
        return MappingProxyType(self._calibration)

    @calibration.setter
    def calibration(self, calibration: Mapping[str, Any] | None) -> None:
        validated = _calibration(dict(calibration) if calibration is not None else None)
        self._calibration, self._variance_factors = validated, _variance_factors(validated)
        self.results = {}

    def reset(self) -> None:
        """Forget the results and everything derived from the model: the cached neighbour list
        and alpha/beta. Call it after changing the model's weights in place."""
        super().reset()
        self._prepared = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, **options: Any) -> BLIPCalculator:
        """Calculator for the model stored at ``path``; ``options`` as for the constructor.

        The checkpoint's calibration scales are used unless ``calibration=`` is given.
        """
        device = resolve_device(options.pop("device", None))
        model, ckpt = load_checkpoint(path, device=device)
        options.setdefault("calibration", ckpt.get("calibration"))
        return cls(model, device=device, **options)

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
        prepared = self._prepare(self.atoms)
        if self.mode == "map":
            self.results = self._map(prepared)
        else:
            self.results = self._monte_carlo(prepared, self.n_samples)

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
        if not self.model.is_bayesian:
            raise ValueError("monte_carlo needs a Bayesian model; this model is deterministic")
        if atoms is None:
            if self.atoms is None:
                raise RuntimeError("monte_carlo() has no configuration: pass atoms or run a calculation first")
            atoms = self.atoms
        n = self.n_samples if n_samples is None else _check_samples(n_samples)
        return self._monte_carlo(self._prepare(atoms), n)

    def _prepare(self, atoms: Atoms) -> _Prepared:
        """The cached configuration, or a new one (input checked, neighbour list built)."""
        key = _snapshot(atoms, self.model)
        if self._prepared is not None and _same(self._prepared.key, key):
            return self._prepared
        validate_atoms(atoms)  # the same clear errors whichever backend builds the graph
        if not np.isin(atoms.numbers, self.model.elements).all():
            species_index(atoms.numbers, self.model.elements)  # raises, listing the known elements
        graph = self.model.build_graph(atoms)
        self._prepared = _Prepared(key, graph, len(atoms), periodic=bool(atoms.pbc.all()))
        return self._prepared

    def _coefficients(self, prepared: _Prepared) -> Any:
        """alpha/beta of the configuration: the inference network runs once per configuration."""
        if not prepared.has_coefficients:
            with torch.no_grad():
                prepared.coefficients = self.model.coefficients(prepared.graph)
            prepared.has_coefficients = True
        return prepared.coefficients

    def _evaluate(self, prepared: _Prepared, noise: NoiseSource | None) -> dict[str, np.ndarray]:
        """Raw per-sample outputs (float64, CPU) of the prepared graph of ``G`` structures (one for
        an ``Atoms``, many for batched walkers): ``energy (S, G)``, ``forces (S, n, 3)``,
        ``stress (S, G, 6)`` (ASE Voigt, periodic only). ``noise=None``: MAP, ``S = 1``."""
        compute_stress = prepared.periodic and self.model.implements_stress
        coefficients = None if noise is None else self._coefficients(prepared)
        if noise is None:
            chunks: list[NoiseSource | None] = [None]
        else:
            n_chunks = -(-noise.n_samples // max(1, self.max_batch_atoms // prepared.n_atoms))
            size = -(-noise.n_samples // n_chunks)  # equal chunks
            period = self.model.sample_period  # ensemble: sample s = member s % period
            size = -(-size // period) * period
            chunks = [noise.split(a, min(a + size, noise.n_samples)) for a in range(0, noise.n_samples, size)]
        parts: dict[str, list[torch.Tensor]] = {}
        for chunk in chunks:
            out = self.model.predict(
                prepared.graph, coefficients=coefficients, noise=chunk, compute_stress=compute_stress
            )
            for key, value in out.items():
                parts.setdefault(key, []).append(value.detach())
        result = {"energy": torch.cat(parts["energy"]), "forces": torch.cat(parts["forces"])}
        if "stress" in parts:
            stress = torch.cat(parts["stress"])
            result["stress"] = matrix_to_voigt(0.5 * (stress + stress.transpose(-1, -2)))
        return {key: value.to("cpu", torch.float64).numpy() for key, value in result.items()}

    def _map(self, prepared: _Prepared) -> dict[str, Any]:
        """MAP results: one deterministic pass, no variances."""
        raw = self._evaluate(prepared, None)
        energy = float(raw["energy"][0, 0])
        results: dict[str, Any] = {"energy": energy, "free_energy": energy, "forces": raw["forces"][0]}
        if "stress" in raw:
            results["stress"] = raw["stress"][0, 0]
        return results

    def _monte_carlo(self, prepared: _Prepared, n_samples: int) -> dict[str, Any]:
        """MC means and calibrated unbiased variances over ``n_samples`` samples (see
        :meth:`samples_per_check` for ensembles and :func:`monte_carlo_statistics`)."""
        noise = NoiseSource.spawn(self.generator, self.samples_per_check(n_samples), device=self.model.device)
        raw = self._evaluate(prepared, noise)
        one = {key: value[:, 0] if key != "forces" else value for key, value in raw.items()}
        return monte_carlo_statistics(one, self._variance_factors, keep_samples=self.keep_samples)

    def samples_per_check(self, n_samples: int) -> int:
        """``n_samples``, or for a model whose samples are a fixed set (a deep ensemble:
        ``sample_period`` members) exactly one sample per member whatever ``n_samples`` says, so
        the mean and the unbiased variance are the ensemble's own (repeating members would shrink
        the variance by ``S (N - 1) / (N (S - 1))`` and weight members unequally when ``N`` does
        not divide ``S``)."""
        period = self.model.sample_period
        return period if period > 1 else n_samples


def monte_carlo_statistics(raw: Mapping[str, np.ndarray], factors: Mapping[str, float], *, keep_samples: bool = False
                           ) -> dict[str, Any]:  # fmt: skip
    """MC means and calibrated unbiased (ddof=1) variances of one structure's samples.

    Args:
        raw: ``energy (S,)``, ``forces (S, n, 3)`` and for periodic cells ``stress (S, 6)``.
        factors: variance multipliers ``{"energy", "forces", "stress"}`` (the calibration).
        keep_samples: also return ``energy_samples`` and ``forces_samples``.

    Returns:
        The MC-mode results of :class:`BLIPCalculator` (see :meth:`BLIPCalculator.monte_carlo`).
    """
    energy = float(raw["energy"].mean())
    results: dict[str, Any] = {
        "energy": energy,
        "free_energy": energy,
        "forces": raw["forces"].mean(axis=0),
        "energy_variance": float(raw["energy"].var(ddof=1)) * factors["energy"],
        "forces_variance": raw["forces"].var(axis=0, ddof=1).sum(axis=-1) * factors["forces"],
    }
    if "stress" in raw:
        results["stress"] = raw["stress"].mean(axis=0)
        results["stress_variance"] = raw["stress"].var(axis=0, ddof=1) * factors["stress"]
    if keep_samples:
        results["energy_samples"] = raw["energy"]
        results["forces_samples"] = raw["forces"]
    return results
