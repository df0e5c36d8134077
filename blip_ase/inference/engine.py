"""The Monte Carlo inference engine: :class:`MonteCarloEngine`.

It turns structures into the model's graph (neighbour list once per configuration, cached), runs
the inference network once per configuration (alpha/beta, cached with the graph), runs the S
Monte Carlo samples of one or many structures as batched passes (chunked so that no pass holds
more than ``max_batch_atoms`` atoms), draws their noise and reduces the samples to means and
calibrated variances. :class:`~blip_ase.calculator.BLIPCalculator` (one ``Atoms``), the
torch-sim model (:mod:`blip_ase.md.torchsim`, many walkers) and ``blip eval``
(:func:`blip_ase.uq.evaluate.predict`, many structures per call) all call it.

It talks to the backend contract only (:class:`~blip_ase.models.potential.Potential`):
``elements``, ``is_bayesian``, ``implements_stress``, ``sample_period``, ``dtype``, ``device``,
``build_graph``/``build_batch``, ``coefficients(graph)`` and ``predict(graph, coefficients=,
noise=, compute_stress=) -> {"energy": (S, G), "forces": (S, N, 3), "stress": (S, G, 3, 3)}``.

Noise: a single structure's S samples are seeded from the engine's own generator (``seed``), so
the same seed gives the same sequence of results. Many structures in one batch take one generator
per structure (:class:`~blip_ase.bayes.StructureNoise`): a structure's samples never depend on
which other structures share its batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from ase import Atoms

from blip_ase.bayes import NoiseSource, StructureNoise, structure_sizes
from blip_ase.configuration import checked_int
from blip_ase.data.graph import species_index, validate_atoms
from blip_ase.devices import resolve_device
from blip_ase.inference.calibration import apply_power, validate_calibration, variance_factors
from blip_ase.inference.llpr import llpr_statistics
from blip_ase.inference.screen import Screen, atom_features, feature_count
from blip_ase.inference.statistics import map_results, monte_carlo_statistics
from blip_ase.models.potential import Potential
from blip_ase.voigt import matrix_to_voigt

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MAX_BATCH_ATOMS = {"cuda": 20000, "cpu": 256}
"""Atoms per batched pass when ``max_batch_atoms`` is None, by device type (other types: CPU's).
Why these values: see the documentation's performance page."""


def checked_samples(n_samples: Any) -> int:
    """``n_samples`` as an int >= 2 (variances are unbiased, ddof=1).

    Raises:
        ValueError: a bool, a non-integer or a number below 2.
    """
    return checked_int(n_samples, least=2, name="n_samples")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"float32"``/``"float64"`` (or a torch dtype) as a torch dtype; None stays None.

    Raises:
        ValueError: any other value.
    """
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or None to keep the model's), got {dtype!r}")
    return DTYPES[dtype]


@dataclass
class Prepared:
    """One configuration of ``G`` structures made ready for the model: neighbour lists once,
    alpha/beta lazily (:meth:`MonteCarloEngine.coefficients`).

    Attributes:
        key: what the tensors depend on (the configuration, the model's dtype and device), so
            tensors built for one dtype/device are never reused after ``model.float()``.
        graph: the backend's batched graph.
        bounds: ``(G + 1,)`` atom offsets of the structures in the batch.
        periodic: every structure is periodic in all three directions (stress is computed).
    """

    key: tuple
    graph: Any
    bounds: np.ndarray
    periodic: bool
    coefficients: Any = None
    has_coefficients: bool = False
    screen_features: list[np.ndarray] | None = None

    @property
    def n_atoms(self) -> int:
        return int(self.bounds[-1])

    @property
    def n_structures(self) -> int:
        return len(self.bounds) - 1


def configuration_key(structures: Sequence[Atoms]) -> tuple:
    """Copies of every structure's positions, cell, pbc and numbers (a key for :meth:`MonteCarloEngine.lookup`)."""
    return tuple(
        array.copy()
        for atoms in structures
        for array in (atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers)
    )


def _same(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                return False
        elif isinstance(x, np.ndarray):
            if not isinstance(y, np.ndarray) or x.shape != y.shape or not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


class MonteCarloEngine:
    """Batched Monte Carlo (and MAP) inference of a :class:`~blip_ase.models.potential.Potential`.

    Args:
        model: the backend; moved in place to ``device``/``dtype`` and put in eval mode.
        device: torch device; None picks CUDA when available, else CPU.
        dtype: ``"float32"``, ``"float64"`` (or a torch dtype); None keeps the model's.
        seed: seeds :attr:`generator`, from which a single structure's samples are seeded.
            None: nondeterministic.
        max_batch_atoms: bound on atoms per batched pass (at least one sample per pass); None:
            :data:`DEFAULT_MAX_BATCH_ATOMS` of the device type.
        calibration: variance scales ``{"energy", "forces", "stress"}`` (missing: 1.0) and
            optional isotonic maps (:mod:`blip_ase.inference.calibration`).
        screen: the cheap uncertainty screen (:mod:`blip_ase.inference.screen`), or None.

    Raises:
        ValueError: a bad option (named).
    """

    def __init__(
        self,
        model: Potential,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int | None = None,
        max_batch_atoms: int | None = None,
        calibration: Mapping[str, Any] | None = None,
        screen: Screen | None = None,
    ):
        to_dtype, to_device = resolve_dtype(dtype), resolve_device(device)
        self.calibration = calibration
        self.model = model.to(to_device, **({"dtype": to_dtype} if to_dtype else {})).eval()
        if max_batch_atoms is None:
            max_batch_atoms = DEFAULT_MAX_BATCH_ATOMS.get(to_device.type, DEFAULT_MAX_BATCH_ATOMS["cpu"])
        self.max_batch_atoms = max_batch_atoms
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self._cached: Prepared | None = None
        self.screen = screen  # checked against the model

    @property
    def max_batch_atoms(self) -> int:
        """Bound on atoms per batched pass (>= 1)."""
        return self._max_batch_atoms

    @max_batch_atoms.setter
    def max_batch_atoms(self, value: int) -> None:
        self._max_batch_atoms = checked_int(value, least=1, name="max_batch_atoms")

    @property
    def screen(self) -> Screen | None:
        """The uncertainty screen (None: every check draws samples)."""
        return self._screen

    @screen.setter
    def screen(self, screen: Screen | None) -> None:
        if screen is not None:
            net = getattr(self.model, "posterior", None)
            if net is None:
                raise ValueError("an uncertainty screen needs a model with an inference network (BLIP); this has none")
            expected = feature_count(len(self.model.elements), net.n_edge_layers, net.n_node_layers)
            if len(screen.weights) != expected:
                raise ValueError(
                    f"the uncertainty screen has {len(screen.weights)} weights but this model's screen inputs have "
                    f"{expected} columns: it was fitted for another model; run blip calibrate again"
                )
        self._screen = screen

    @property
    def calibration(self) -> Mapping[str, Any]:
        """The variance calibration in use (read-only view; assign a new mapping to change it)."""
        return MappingProxyType(self._calibration)

    @calibration.setter
    def calibration(self, calibration: Mapping[str, Any] | None) -> None:
        validated = validate_calibration(calibration)
        self._calibration, self._factors = validated, variance_factors(validated)
        self._forces_power = validated.get("forces_power")

    @property
    def variance_factors(self) -> dict[str, float]:
        """Variance multiplier per quantity (scale times isotonic factor)."""
        return dict(self._factors)

    def clear_cache(self) -> None:
        """Forget the cached graph and alpha/beta (after changing the model's weights in place)."""
        self._cached = None

    # --- configurations ------------------------------------------------------------------------
    def lookup(self, key: tuple) -> Prepared | None:
        """The cached configuration of ``key`` (from :func:`configuration_key` or the caller's own
        tensors), or None. The model's dtype and device are part of the key."""
        full = (*key, str(self.model.dtype), str(self.model.device))
        cached = self._cached
        return cached if cached is not None and _same(cached.key, full) else None

    def prepare(self, structures: Atoms | Sequence[Atoms], *, key: tuple | None = None) -> Prepared:
        """The configuration of one structure or a batch of them: input checked, neighbour lists
        built, cached until another configuration is prepared.

        Args:
            structures: an ``Atoms`` or a sequence of them (batched in this order).
            key: what identifies the configuration; None = :func:`configuration_key`.

        Raises:
            ValueError: no structure, an element the model does not know, non-finite positions,
                a periodic cell of zero volume, or empty ``Atoms``.
        """
        structures = [structures] if isinstance(structures, Atoms) else list(structures)
        if not structures:
            raise ValueError("nothing to evaluate: no structure given")
        key = configuration_key(structures) if key is None else key
        cached = self.lookup(key)
        if cached is not None:
            return cached
        for atoms in structures:
            validate_atoms(atoms)  # the same clear errors whichever backend builds the graph
            if not np.isin(atoms.numbers, self.model.elements).all():
                species_index(atoms.numbers, self.model.elements)  # raises, listing the known elements
        if len(structures) == 1:
            graph = self.model.build_graph(structures[0])
        else:
            graph = self.model.build_batch(structures)
        bounds = np.concatenate([[0], np.cumsum([len(a) for a in structures])])
        periodic = all(bool(a.pbc.all()) for a in structures)
        full = (*key, str(self.model.dtype), str(self.model.device))
        self._cached = Prepared(full, graph, bounds, periodic)
        return self._cached

    def coefficients(self, prepared: Prepared) -> Any:
        """alpha/beta of the configuration: the inference network runs once per configuration."""
        if not prepared.has_coefficients:
            with torch.no_grad():
                prepared.coefficients = self.model.coefficients(prepared.graph)
            prepared.has_coefficients = True
        return prepared.coefficients

    def screen_bound(self, prepared: Prepared, forces: np.ndarray | None = None) -> list[np.ndarray]:
        """Per structure, ``(n,)`` the screen's conservative bound on the calibrated per-atom force
        std (eV/A): ``safety * estimate * sqrt(forces factor)`` (with a power-law calibration, the
        calibrated std of the variance ``(safety * estimate)^2``), from alpha/beta, the MAP forces
        and neighbour distances alone (no Monte Carlo sample).

        Args:
            prepared: the configuration.
            forces: ``(N, 3)`` its MAP forces (eV/A) when the caller has them (MAP dynamics);
                None: computed here (one MAP pass).

        Raises:
            ValueError: the engine has no screen, or the model has no inference network.
        """
        if self.screen is None:
            raise ValueError("this model has no uncertainty screen (blip calibrate fits one)")
        if prepared.screen_features is None:
            if forces is None:
                forces = np.concatenate([r["forces"] for r in self.map(prepared, stress=False)])
            with torch.no_grad():
                if prepared.has_coefficients:
                    coefficients = prepared.coefficients
                else:
                    coefficients = self.model.coefficients(prepared.graph, jacobian=False)
                inputs = self.model.posterior_inputs(prepared.graph)
            features = atom_features(coefficients, inputs, forces, len(self.model.elements))
            b = prepared.bounds
            prepared.screen_features = [features[b[g] : b[g + 1]] for g in range(prepared.n_structures)]
        factor, power = self._factors["forces"], self._forces_power
        # the power map is monotone: a bound on the raw std maps to a bound on the calibrated std
        return [np.sqrt(factor * apply_power((self.screen.safety * self.screen.estimate(f)) ** 2, power))
                for f in prepared.screen_features]

    # --- passes --------------------------------------------------------------------------------
    def evaluate(self, prepared: Prepared, noise: NoiseSource | None, *, stress: bool = True) -> dict[str, np.ndarray]:
        """Raw per-sample outputs (float64, CPU) of the configuration's ``G`` structures:
        ``energy (S, G)`` eV, ``forces (S, N, 3)`` eV/A, ``stress (S, G, 6)`` eV/A^3 (ASE Voigt;
        with ``stress``, for periodic structures and a model with stress only). ``noise=None``:
        MAP, ``S = 1``."""
        compute_stress = stress and prepared.periodic and self.model.implements_stress
        coefficients = None if noise is None else self.coefficients(prepared)
        parts: dict[str, list[torch.Tensor]] = {}
        for chunk in self._chunks(noise, prepared.n_atoms):
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

    def _chunks(self, noise: NoiseSource | None, n_atoms: int) -> list[NoiseSource | None]:
        """The samples of ``noise`` in equal chunks of at most ``max_batch_atoms`` atoms per pass
        (a deep ensemble's chunks hold whole periods of members)."""
        if noise is None:
            return [None]
        n_chunks = -(-noise.n_samples // max(1, self.max_batch_atoms // n_atoms))
        size = -(-noise.n_samples // n_chunks)
        period = self.model.sample_period  # ensemble: sample s = member s % period
        size = -(-size // period) * period
        return [noise.split(a, min(a + size, noise.n_samples)) for a in range(0, noise.n_samples, size)]

    def samples_per_check(self, n_samples: int) -> int:
        """``n_samples``, or for a model whose samples are a fixed set (a deep ensemble:
        ``sample_period`` members) exactly one sample per member whatever ``n_samples`` says, so
        the mean and the unbiased variance are the ensemble's own (repeating members would shrink
        the variance by ``S (N - 1) / (N (S - 1))`` and weight members unequally when ``N`` does
        not divide ``S``)."""
        period = self.model.sample_period
        return period if period > 1 else checked_samples(n_samples)

    def map(self, prepared: Prepared, *, stress: bool = True) -> list[dict[str, Any]]:
        """MAP results of every structure (one deterministic pass; no variances)."""
        raw = self.evaluate(prepared, None, stress=stress)
        return [map_results(part) for part in self._split(raw, prepared)]

    def monte_carlo(
        self,
        prepared: Prepared,
        n_samples: int,
        *,
        generators: Sequence[torch.Generator] | None = None,
        keep_samples: bool = False,
        stress: bool = True,
    ) -> list[dict[str, Any]]:
        """Monte Carlo statistics of every structure of ``prepared``, all samples batched.

        Args:
            prepared: from :meth:`prepare`.
            n_samples: S (a deep ensemble takes one sample per member).
            generators: one per structure; structure ``g``'s S noise seeds are drawn from
                ``generators[g]``, so its numbers do not depend on its batch-mates. None (one
                structure only): the engine's :attr:`generator`.
            keep_samples: also return the samples.
            stress: compute the stress of periodic structures (dynamics at constant cell skip it).

        Returns:
            Per structure, :func:`~blip_ase.inference.statistics.monte_carlo_statistics` with the
            engine's calibration.

        A deterministic model carrying LLPR data (``model.llpr``) gives its MAP results with
        closed-form variances instead (:func:`~blip_ase.inference.llpr.llpr_statistics`; no
        samples: ``n_samples``, ``generators`` and ``keep_samples`` are irrelevant).

        Raises:
            ValueError: a deterministic model without LLPR, or a generator count that does not match.
        """
        if self.model.llpr is not None:
            return llpr_statistics(self.model, prepared, self.map(prepared, stress=stress), self._factors,
                                   forces_power=self._forces_power)
        if not self.model.is_bayesian:
            raise ValueError("Monte Carlo needs a Bayesian model; this model is deterministic")
        n = self.samples_per_check(n_samples)
        device = self.model.device
        if generators is None:
            if prepared.n_structures != 1:
                raise ValueError(f"{prepared.n_structures} structures need one generator each")
            noise: NoiseSource = NoiseSource.spawn(self.generator, n, device=device)
        else:
            if len(generators) != prepared.n_structures:
                raise ValueError(f"{len(generators)} generators for {prepared.n_structures} structures")
            edges, nodes = structure_sizes(self.model, prepared.graph, prepared.n_structures)
            noise = StructureNoise.spawn_per_structure(list(generators), n, edges, nodes, device=device)
        raw = self.evaluate(prepared, noise, stress=stress)
        return [
            monte_carlo_statistics(part, self._factors, keep_samples=keep_samples, forces_power=self._forces_power)
            for part in self._split(raw, prepared)
        ]

    @staticmethod
    def _split(raw: Mapping[str, np.ndarray], prepared: Prepared) -> list[dict[str, np.ndarray]]:
        """Per structure: ``energy (S,)``, ``forces (S, n, 3)``, ``stress (S, 6)``."""
        b = prepared.bounds
        parts = []
        for g in range(prepared.n_structures):
            part = {"energy": raw["energy"][:, g], "forces": raw["forces"][:, b[g] : b[g + 1]]}
            if "stress" in raw:
                part["stress"] = raw["stress"][:, g]
            parts.append(part)
        return parts
