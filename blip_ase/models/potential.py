"""The backend interface used by the calculator, MD and training, and its PaiNN implementation.

A :class:`Potential` turns ``ase.Atoms`` into its own graph once per configuration
(:meth:`Potential.build_graph`), computes the noise coefficients once per configuration
(:meth:`Potential.coefficients`) and evaluates ``S`` Monte Carlo samples in one batched
forward and one backward (:meth:`Potential.forward`). MAP mode is ``noise=None``.
"""

from __future__ import annotations

import importlib
from abc import ABCMeta, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np
import torch
from ase import Atoms
from torch import nn
from torch_geometric.utils import scatter

from blip_ase.bayes import (
    BayesConfig,
    Coefficients,
    InferenceNetwork,
    NoiseSource,
    PosteriorInputs,
    bayesianize,
    dropoutize,
    input_gradients_only,
    no_coefficients,
    noise_context,
)
from blip_ase.data.graph import AtomGraph, atoms_to_graph, molecules_to_graph
from blip_ase.models.painn import EDGE_PATTERN, NODE_PATTERN, PaiNN, PaiNNConfig


class Potential(nn.Module, metaclass=ABCMeta):
    """The backend contract: everything the calculator, MD, training and checkpoints use.

    A backend subclasses this, sets ``backend``, implements the abstract methods and runs the
    contract's test battery (:mod:`blip_ase.testing`). Callers use nothing else.

    Attributes:
        backend: the name stored in checkpoints (a key of :data:`BACKENDS`).
        implements_stress: whether ``forward(compute_stress=True)`` works (a property where it
            depends on the instance).
        implements_descriptors: whether :meth:`descriptors` works.
        elements: atomic numbers the model knows, in species-index order.
        bayes: the BLIP configuration, or None for a deterministic model.
        cutoff: neighbour cutoff, Angstrom.
        posterior: the inference network (alpha per edge, beta per node), or None (deterministic
            models, MC dropout, ensembles).
        scale: ``()`` buffer, the energy unit scale; checkpoints read the model's dtype from it.
        sample_period: 1, or ``N`` for a model whose samples are a fixed set of ``N`` (a deep
            ensemble: sample ``s`` is member ``s % N``); batched chunks start at multiples of it.
        alpha_needs_jacobian: whether forces are derivatives of the energy, so that alpha must
            carry its derivative with respect to the edge vectors (False for direct forces).
    """

    backend: ClassVar[str]
    implements_stress: ClassVar[bool] = True
    implements_descriptors: ClassVar[bool] = False
    alpha_needs_jacobian: ClassVar[bool] = True
    cutoff: float
    posterior: InferenceNetwork | None
    llpr: dict | None = None
    """LLPR data of a deterministic model (plain lists and floats, see
    :mod:`blip_ase.inference.llpr`), set from its checkpoint; None: no LLPR."""

    def __init__(self, elements: list[int], bayes: BayesConfig | None, *, cutoff: float):
        super().__init__()
        self.elements = [int(z) for z in elements]
        self.bayes = bayes
        self.cutoff = float(cutoff)
        self.posterior = None
        self.register_buffer("scale", torch.ones(()))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def is_bayesian(self) -> bool:
        return self.bayes is not None

    @property
    def has_uncertainty(self) -> bool:
        """Whether ``mode="mc"`` gives variances: a Bayesian model (Monte Carlo) or one carrying
        LLPR data (closed form)."""
        return self.is_bayesian or self.llpr is not None

    @property
    def sample_period(self) -> int:
        return 1

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict) -> Potential:
        """The architecture described by :meth:`config_dict` (weights come from a state_dict)."""

    @abstractmethod
    def config_dict(self) -> dict:
        """JSON-ready architecture: elements, backend settings, ``bayes``."""

    @abstractmethod
    def build_graph(self, atoms: Atoms) -> Any:
        """This backend's graph of one structure (neighbour list), on the model's device and dtype."""

    def batch(self, graphs: list[Any]) -> Any:
        """One disjoint batch of graphs from :meth:`build_graph`, structures in the given order
        (the default concatenates :class:`~blip_ase.data.graph.AtomGraph` objects)."""
        from blip_ase.data.graph import batch_graphs

        return batch_graphs(graphs)

    def build_batch(self, structures: list[Atoms]) -> Any:
        """The batched graph of ``structures``: :meth:`batch` of each :meth:`build_graph` (a backend
        may build it at once, e.g. one neighbour list for many molecules); same result."""
        return self.batch([self.build_graph(atoms) for atoms in structures])

    def posterior_inputs(self, graph: Any) -> PosteriorInputs:
        """What the inference network sees, in its one convention: ``species (N,)``,
        ``edge_index (2, E)`` as (receiver i, sender j), edge vectors ``(E, 3)`` ``r_j - r_i``
        (+ lattice shift of j) in Angstrom, and each atom's structure (see
        :class:`~blip_ase.bayes.PosteriorInputs`)."""
        raise NotImplementedError(f"{type(self).__name__} has no inference network inputs")

    def _rerun_posterior(self) -> bool:
        """True when :meth:`forward` reruns the inference network on its own edge vectors, so
        :meth:`coefficients` need not carry the Jacobian (PaiNN in training)."""
        return False

    def coefficients(self, graph: Any, *, jacobian: bool = True) -> Coefficients | None:
        """alpha per edge and beta per node of ``graph``, once per configuration (None for a
        deterministic model; zero columns for MC dropout, which has no learned rates).

        ``jacobian=False``: the values only, without d alpha / d edge vector (what a cheap
        uncertainty screen needs; samples need the Jacobian for exact forces)."""
        if self.bayes is None:
            return None
        x = self.posterior_inputs(graph)
        if self.posterior is None:
            return no_coefficients(x.edge_index.shape[1], len(x.species), like=x.edge_vector)
        if not jacobian or not self.alpha_needs_jacobian or self._rerun_posterior():
            return self.posterior(x.species, x.edge_index, x.edge_vector)
        # alpha depends on the edge vectors: keep d alpha / d vector so that forward() can give
        # every sample the full derivative of its energy (the network still runs once).
        create_graph = self.training and torch.is_grad_enabled()
        return self.posterior.with_jacobian(x.species, x.edge_index, x.edge_vector, create_graph=create_graph)

    @abstractmethod
    def forward(
        self,
        graph: Any,
        *,
        coefficients: Coefficients | None = None,
        noise: NoiseSource | None = None,
        compute_forces: bool = True,
        compute_stress: bool = False,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Energies, forces and stresses of ``S = noise.n_samples`` samples in one pass.

        Args:
            graph: batch of ``G`` structures with ``N`` atoms in total, from :meth:`build_graph`.
            coefficients: from :meth:`coefficients` of the same graph (computed once, reused).
            noise: Monte Carlo noise; None (or no coefficients) = MAP, ``S = 1``.
            compute_forces, compute_stress: what to return (stress needs periodic cells).
            create_graph: keep the graph of the derivatives (training on forces).

        Returns:
            ``energy (S, G)`` eV; ``forces (S, N, 3)`` eV/A; ``stress (S, G, 3, 3)`` eV/A^3
            (``dE/d(strain) / V``).
        """

    def predict(
        self, graph: Any, *, coefficients: Coefficients | None, noise: NoiseSource | None, compute_stress: bool
    ) -> dict[str, torch.Tensor]:
        """:meth:`forward` with forces for inference: only derivatives with respect to the inputs
        (forces, stress) are taken, never parameter gradients, so sampling layers may use their
        cheaper hand-written backward (:func:`blip_ase.bayes.input_gradients_only`). What the
        calculator calls; training calls :meth:`forward`."""
        with input_gradients_only():
            return self(graph, coefficients=coefficients, noise=noise, compute_stress=compute_stress)

    def last_layer_features(
        self, graph: Any, *, positions: torch.Tensor | None = None, strain: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(G, D)`` last-layer features of the ``G`` structures of ``graph`` (MAP weights), in eV
        per unit of the last layer's weights: the energy is ``w . f`` plus terms that do not
        depend on ``w`` (LLPR, :mod:`blip_ase.inference.llpr`). Differentiable with respect to
        ``positions`` ``(N, 3)`` A (None: the graph's) and ``strain`` ``(G, 3, 3)`` (None: no strain;
        applied as in :meth:`forward`), so their Jacobians give the force and stress features.

        Raises:
            NotImplementedError: the backend does not expose them (LLPR needs them).
        """
        raise NotImplementedError(
            f"the {self.backend!r} backend gives no last-layer features, which LLPR (last-layer prediction "
            "rigidity) needs; LLPR is implemented for PaiNN"
        )

    def descriptors(self, graph: Any) -> torch.Tensor:
        """``(N, D)`` invariant per-atom features of ``graph`` (a batch of structures with ``N``
        atoms in total, atoms in graph order), in MAP mode: what active learning compares
        structures by (farthest-point selection, near-duplicate filter).

        Contract (:func:`blip_ase.testing.check_descriptors`): invariant under translation (and
        rotation for an equivariant backend), an atom's row depends only on its own structure
        (batching does not mix structures), no gradient is recorded.

        Raises:
            NotImplementedError: a backend without descriptors (:attr:`implements_descriptors`).
        """
        raise NotImplementedError(f"the {self.backend} backend has no descriptors")

    def make_bayesian(self, module: nn.Module, *, edge_pattern: str, node_pattern: str) -> None:
        """Wrap ``module``'s matching linears and build :attr:`posterior` from :attr:`bayes`
        (the one construction of the inference network for every backend); patterns set in
        ``bayes`` take precedence over the backend defaults given here."""
        b = self.bayes
        edge, node = bayesianize(
            module, edge_pattern=b.edge_pattern or edge_pattern, node_pattern=b.node_pattern or node_pattern
        )
        self.posterior = InferenceNetwork(
            len(self.elements), len(edge), len(node), cutoff=self.cutoff, hidden=b.hidden, n_hidden=b.n_hidden,
            n_rbf=b.n_rbf, unit_vector=b.unit_vector, p_min=b.p_min, p_max=b.p_max, p_init=b.p_init,
            neighbourhood=b.neighbourhood, environment=b.environment,
        )  # fmt: skip

    def bayesian_layout(self) -> dict[str, list[str]]:
        """Which linears are Bayesian, in the column order of alpha (``"edge"``) and beta
        (``"node"``): ``{"edge": [module names], "node": [...]}``; empty lists when none.

        Stored in checkpoints and checked at load, so a change of the wrapped layers or of their
        order (e.g. an orb-models upgrade renaming modules) is an error, not permuted noise.
        """
        from blip_ase.bayes.linear import BayesianLinear

        layout: dict[str, list[tuple[int, str]]] = {"edge": [], "node": []}
        for name, module in self.named_modules():
            if isinstance(module, BayesianLinear):
                layout[module.role].append((module.column, name))
        return {role: [name for _, name in sorted(entries)] for role, entries in layout.items()}

    def make_dataset(self, frames: list[Atoms], *, use_stress: bool = False, name: str = "data") -> Any:
        """Labelled graphs of ``frames`` in this backend's graph format, for training.

        Returns:
            A :class:`~blip_ase.data.dataset.GraphDataset` (or one with the same interface).
        """
        from blip_ase.data.dataset import GraphDataset
        from blip_ase.data.graph import batch_graphs

        def to_graph(atoms: Atoms) -> AtomGraph:
            return atoms_to_graph(atoms, cutoff=self.cutoff, elements=self.elements)

        return GraphDataset(frames, to_graph=to_graph, collate=batch_graphs, use_stress=use_stress, name=name)

    def fit_normalisation(self, frames: list[Atoms], energies: np.ndarray, forces: np.ndarray) -> None:
        """Set data-dependent constants (reference energies, scales) from the training set.

        Args:
            frames: training structures; energies: ``(F,)`` eV; forces: ``(sum n, 3)`` eV/A.
        """


class PaiNNPotential(Potential):
    """Conservative PaiNN potential with optional BLIP noise.

    ``E = sum_i (scale * (y_i - y_lone[Z_i]) + E_ref[Z_i])``, where ``y_lone`` is the MAP
    network output of a lone atom of that element, so an atom without neighbours has exactly its
    reference energy in MAP mode (in sampling mode its own update noise remains); forces
    ``-dE/dr``, stress
    ``(1/V) dE/d(strain)`` (ASE sign and Voigt conventions are applied by the calculator).

    Args:
        elements: atomic numbers, in species-index order.
        config: architecture.
        bayes: BLIP settings; None builds the deterministic model with plain linears.
    """

    backend = "painn"
    implements_descriptors = True

    def __init__(self, elements: list[int], config: PaiNNConfig = PaiNNConfig(), bayes: BayesConfig | None = None):
        super().__init__(elements, bayes, cutoff=config.cutoff)
        self.config = config
        self.net = PaiNN(len(self.elements), config)
        self.register_buffer("reference_energies", torch.zeros(len(self.elements)))
        if bayes is not None and bayes.method == "mc_dropout":
            edge_pattern, node_pattern = bayes.edge_pattern or EDGE_PATTERN, bayes.node_pattern or NODE_PATTERN
            dropoutize(self.net, edge_pattern=edge_pattern, node_pattern=node_pattern, p=bayes.dropout_p)
        elif bayes is not None:
            self.make_bayesian(self.net, edge_pattern=EDGE_PATTERN, node_pattern=NODE_PATTERN)

    def config_dict(self) -> dict:
        return {"elements": self.elements, "painn": asdict(self.config), "bayes": self.bayes and asdict(self.bayes)}

    @classmethod
    def from_config(cls, config: dict) -> PaiNNPotential:
        bayes = config.get("bayes")
        return cls(config["elements"], PaiNNConfig(**config["painn"]), BayesConfig(**bayes) if bayes else None)

    @torch.no_grad()
    def fit_normalisation(self, frames: list[Atoms], energies: np.ndarray, forces: np.ndarray) -> None:
        """Per-element reference energies (least squares, plus the mean per-atom residual) and the
        force scale (RMS force component) from the training set."""
        from blip_ase.data.dataset import energy_statistics

        ref, residual, rms = energy_statistics(frames, energies, forces, self.elements)
        self.reference_energies.copy_(torch.as_tensor(ref + np.mean(residual)))
        self.scale.fill_(rms if rms > 1e-8 else 1.0)

    def build_graph(self, atoms: Atoms) -> AtomGraph:
        """Neighbour list and tensors of one structure, on the model's device and dtype."""
        return atoms_to_graph(atoms, cutoff=self.cutoff, elements=self.elements).to(self.device, self.dtype)

    def build_batch(self, structures: list[Atoms]) -> AtomGraph:
        """:meth:`Potential.build_batch`; molecules share one neighbour list
        (:func:`~blip_ase.data.graph.molecules_to_graph`)."""
        if any(atoms.pbc.any() for atoms in structures):
            return super().build_batch(structures)
        return molecules_to_graph(structures, cutoff=self.cutoff, elements=self.elements).to(self.device, self.dtype)

    @staticmethod
    def edge_vectors(graph: AtomGraph, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """``(E, 3)`` vectors r_j - r_i + shift @ cell for the given positions and cells."""
        i, j = graph.edge_index
        shift = torch.einsum("ek,ekl->el", graph.cell_shifts, cell.index_select(0, graph.batch.index_select(0, i)))
        return positions.index_select(0, j) - positions.index_select(0, i) + shift

    def _rerun_posterior(self) -> bool:
        """In training (grad enabled) the inference network runs inside :meth:`forward` on the
        pass's own edge vectors: exact derivatives, and cheaper to differentiate twice than
        the Jacobian of :meth:`InferenceNetwork.with_jacobian`."""
        return self.posterior is not None and self.training and torch.is_grad_enabled()

    def posterior_inputs(self, graph: AtomGraph) -> PosteriorInputs:
        """:meth:`Potential.posterior_inputs`: the graph's own edges and vectors."""
        vectors = self.edge_vectors(graph, graph.positions, graph.cell)
        return PosteriorInputs(graph.species, graph.edge_index, vectors, graph.batch, graph.n_graphs)

    def lone_atom_output(self) -> torch.Tensor:
        """``(n_elements,)`` MAP network output of one atom of each element with no neighbours.

        In eval mode it is cached until a parameter changes (in place or by ``to()``), so MAP
        dynamics pay for it once; in training mode it is recomputed (it depends on the weights).
        """
        key = None
        if not self.training:
            key = tuple((p.data_ptr(), p._version) for p in self.net.parameters())
            cached = getattr(self, "_lone_cache", None)
            if cached is not None and cached[0] == key:
                return cached[1]
        species = torch.arange(len(self.elements), device=self.device)
        no_edges = torch.zeros(2, 0, dtype=torch.long, device=self.device)
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            out = self.net(species, no_edges, torch.zeros(0, 3, dtype=self.dtype, device=self.device))
        if key is not None:
            self._lone_cache = (key, out)
        return out

    def last_layer_features(
        self, graph: AtomGraph, *, positions: torch.Tensor | None = None, strain: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`Potential.last_layer_features`: ``f = scale * sum_i (h_i - h_lone[Z_i])``, ``(G, D)``
        with ``D = n_features // 2``, where ``h_i`` is atom i's activation entering the readout's
        final Linear (weights ``w = net.readout[-1].weight[0]``) and ``h_lone`` that of a lone atom;
        so the MAP energy is exactly ``w . f + sum_i E_ref[Z_i]`` (the final bias cancels)."""
        positions = graph.positions if positions is None else positions
        cell = graph.cell
        if strain is not None:
            positions = positions + torch.einsum("ni,nij->nj", positions, strain[graph.batch])
            cell = cell + torch.bmm(cell, strain)
        vectors = self.edge_vectors(graph, positions, cell)
        hidden = self.net.readout[:-1]
        h = hidden(self.net.scalar_features(graph.species, graph.edge_index, vectors))
        species = torch.arange(len(self.elements), device=h.device)
        no_edges = torch.zeros(2, 0, dtype=torch.long, device=h.device)
        lone = hidden(self.net.scalar_features(species, no_edges, h.new_zeros(0, 3)))
        per_atom = self.scale * (h - lone[graph.species])
        return scatter(per_atom, graph.batch, 0, dim_size=graph.n_graphs, reduce="sum")

    @torch.no_grad()
    def descriptors(self, graph: AtomGraph) -> torch.Tensor:
        """:meth:`Potential.descriptors`: PaiNN's scalar features entering the readout
        ``(N, n_features)``, MAP (no noise)."""
        vectors = self.edge_vectors(graph, graph.positions, graph.cell)
        return self.net.scalar_features(graph.species, graph.edge_index, vectors)

    def forward(  # the signature of Potential.forward
        self, graph: AtomGraph, *, coefficients: Coefficients | None = None, noise: NoiseSource | None = None,
        compute_forces: bool = True, compute_stress: bool = False, create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """:meth:`Potential.forward`; forces and stress are derivatives of each sample's energy."""
        sampling = noise is not None and coefficients is not None
        n_samples = noise.n_samples if sampling else 1
        g = graph.replicate(n_samples)
        positions = g.positions.detach().requires_grad_(compute_forces)
        cell = g.cell
        inputs = [positions] if compute_forces else []
        if compute_stress:
            strain = torch.zeros_like(cell, requires_grad=True)
            positions = positions + torch.einsum("ni,nij->nj", positions, strain[g.batch])
            cell = cell + torch.bmm(cell, strain)
            inputs.append(strain)
        vectors = self.edge_vectors(g, positions, cell)
        if sampling and self._rerun_posterior():
            coefficients = self.posterior(g.species, g.edge_index, vectors)
        elif sampling:
            coefficients = coefficients.repeat(n_samples).edge_at(vectors)
        # prediction (first derivatives only): the S copies share their radial filters
        copies = n_samples if sampling and not create_graph and not self.training else 1
        with noise_context(self.net, coefficients if sampling else None, noise if sampling else None):
            y = self.net(g.species, g.edge_index, vectors, copies=copies)
        atom_energy = self.scale * (y - self.lone_atom_output()[g.species]) + self.reference_energies[g.species]
        energy = scatter(atom_energy, g.batch, 0, dim_size=g.n_graphs, reduce="sum")
        out = {"energy": energy.view(n_samples, graph.n_graphs)}
        if inputs:
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph)
            if compute_forces:
                out["forces"] = -grads[0].view(n_samples, -1, 3)
            if compute_stress:
                volume = torch.linalg.det(g.cell).abs()
                out["stress"] = (grads[-1] / volume[:, None, None]).view(n_samples, graph.n_graphs, 3, 3)
        return out


class _BackendRegistry(Mapping):
    """Backend name -> :class:`Potential` subclass. Backends with heavy dependencies (ORB v3:
    orb-models) are registered by import path and imported on first lookup, so importing
    ``blip_ase.models`` stays light."""

    def __init__(self, loaded: dict[str, type[Potential]], lazy: dict[str, str]):
        self._loaded = dict(loaded)
        self._lazy = dict(lazy)  # name -> "module:attribute"

    def __getitem__(self, name: str) -> type[Potential]:
        if name not in self._loaded:
            if name not in self._lazy:
                raise KeyError(name)
            module, _, attr = self._lazy[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*self._loaded, *self._lazy}))

    def __len__(self) -> int:
        return len({*self._loaded, *self._lazy})


BACKENDS: Mapping[str, type[Potential]] = _BackendRegistry(
    {"painn": PaiNNPotential},
    {"orb": "blip_ase.models.orb:OrbPotential", "ensemble": "blip_ase.models.ensemble:EnsemblePotential"},
)
