"""ORB v3 (orb-models >= 0.5.5) as a BLIP backend: direct and conservative models.

The base model is orb-models' own regressor (``orb_v3_direct_architecture`` or
``orb_v3_conservative_architecture``), optionally loaded from a local weights file (a plain
state_dict, as orb-models distributes them), then made Bayesian by the same
:func:`blip_ase.bayes.bayesianize` used for PaiNN: the linears of every interaction's edge MLP
(``model.gnn_stacks.<l>._edge_mlp.mlp.NN-<k>``, alpha per edge) and node MLP
(``..._node_mlp.mlp.NN-<k>``, beta per node). State_dict keys of the base model are unchanged,
so ``potential.net.state_dict()`` loads back into a plain orb-models model.

ORB's normalisers (the energy, force and stress heads' running mean/std) are frozen: they keep
the base model's statistics during fine-tuning. A randomly initialised model instead gets them,
and its per-element reference energies, from the training data once (:meth:`fit_normalisation`).

Direct models take forces and stress from their heads; conservative ones from the gradients of
the energy (stress ``(1/V) dE/d(strain)`` with a symmetric strain, as orb-models does).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from ase import Atoms

from blip_ase.bayes import BayesConfig, Coefficients, NoiseSource, PosteriorInputs, noise_context
from blip_ase.configuration import PATH
from blip_ase.data.dataset import energy_statistics
from blip_ase.models.potential import Potential
from blip_ase.voigt import voigt_to_matrix

if TYPE_CHECKING:  # orb-models is imported when a model is built, not with this module
    from blip_ase.data.dataset import GraphDataset
    from blip_ase.models.orb_graph import OrbGraph

EDGE_PATTERN = r"model\.gnn_stacks\.\d+\._edge_mlp\.mlp\.NN-\d+"
NODE_PATTERN = r"model\.gnn_stacks\.\d+\._node_mlp\.mlp\.NN-\d+"

# The paper's silica fine-tuning setup (appendix C.3): posterior 4 x 64 swish, edge input unit
# vector + 20 Gaussian RBFs, p in [1e-5, 0.1], p0 = 0.01, lambda = 1e-3.
ORB_BAYES = BayesConfig(
    p0=0.01, kl_weight=1e-3, p_min=1e-5, p_max=0.1, p_init=0.01, hidden=64, n_hidden=4, n_rbf=20, unit_vector=True
)

# orb-models' named ORB v3 models: (kind, max_num_neighbors); all use the default v3 sizes.
NAMED_MODELS: dict[str, tuple[str, int]] = {
    f"orb-v3-{kind}-{nbr}-{data}": (kind, 20 if nbr == "20" else 120)
    for kind in ("conservative", "direct")
    for nbr in ("20", "inf")
    for data in ("omat", "mpa")
}


@dataclass(frozen=True)
class OrbConfig:
    """Base ORB v3 model of the backend.

    Attributes:
        model: a named orb-models model (e.g. ``orb-v3-conservative-inf-omat``); fixes ``kind``,
            ``max_num_neighbors`` and the architecture sizes to orb-models' defaults. None: use
            the fields below.
        weights_path: local file with the base model's state_dict (as downloaded from
            orb-models); None: random initialisation (e.g. training from scratch, tests). In a
            YAML config a relative path is relative to the file's directory.
        kind: ``direct`` (forces/stress heads) or ``conservative`` (gradients of the energy).
        latent_dim, base_mlp_hidden_dim, base_mlp_depth, head_mlp_hidden_dim, head_mlp_depth,
            num_message_passing_steps, activation: architecture (orb-models' argument names).
        radius: neighbour radius in Angstrom. max_num_neighbors: neighbours kept per atom.
        has_stress: direct models only: build the stress head.
    """

    model: str | None = None
    weights_path: str | None = dataclasses.field(default=None, metadata=PATH)
    kind: Literal["direct", "conservative"] = "conservative"
    latent_dim: int = 256
    base_mlp_hidden_dim: int = 1024
    base_mlp_depth: int = 2
    head_mlp_hidden_dim: int = 256
    head_mlp_depth: int = 1
    num_message_passing_steps: int = 5
    activation: str = "silu"
    radius: float = 6.0
    max_num_neighbors: int = 20
    has_stress: bool = True

    def resolved(self) -> OrbConfig:
        """This config with a named model's kind, sizes and neighbour count filled in."""
        if self.model is None:
            return self
        if self.model not in NAMED_MODELS:
            raise ValueError(f"unknown ORB model {self.model!r}; known: {sorted(NAMED_MODELS)} (or model: null)")
        kind, neighbours = NAMED_MODELS[self.model]
        defaults = {f.name: f.default for f in dataclasses.fields(OrbConfig) if f.name not in ("model", "weights_path")}
        return dataclasses.replace(self, **{**defaults, "kind": kind, "max_num_neighbors": neighbours})


def build_regressor(config: OrbConfig) -> torch.nn.Module:
    """orb-models' ORB v3 regressor for ``config`` (random weights, float32, CPU)."""
    from orb_models.forcefield import pretrained
    from orb_models.forcefield.atomic_system import SystemConfig

    cfg = config.resolved()
    arch = pretrained.orb_v3_direct_architecture if cfg.kind == "direct" else pretrained.orb_v3_conservative_architecture
    return arch(
        latent_dim=cfg.latent_dim,
        base_mlp_hidden_dim=cfg.base_mlp_hidden_dim,
        base_mlp_depth=cfg.base_mlp_depth,
        head_mlp_hidden_dim=cfg.head_mlp_hidden_dim,
        head_mlp_depth=cfg.head_mlp_depth,
        num_message_passing_steps=cfg.num_message_passing_steps,
        activation=cfg.activation,
        has_stress=cfg.has_stress,
        device="cpu",
        system_config=SystemConfig(radius=cfg.radius, max_num_neighbors=cfg.max_num_neighbors),
    )


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def load_base_weights(regressor: torch.nn.Module, path: str | Path) -> None:
    """Load a plain orb-models state_dict from ``path`` into ``regressor`` (before wrapping).

    Extra ``heads.*`` keys the architecture lacks (heads of other variants) are skipped with a
    warning, as orb-models does; every other difference is an error.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the keys or shapes do not match the architecture; the message names the
            first mismatched keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ORB weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    expected = regressor.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    extra_heads = [k for k in unexpected if k.startswith("heads.")]
    unexpected = [k for k in unexpected if not k.startswith("heads.")]
    shapes = [
        f"{k} {tuple(state[k].shape)} in file vs {tuple(v.shape)} in model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_first(shapes, 3)}")
    if problems:
        raise ValueError(
            f"{path}: weights do not match the chosen ORB architecture ({'; '.join(problems)}); "
            "check orb.model / orb.kind and the architecture sizes in the config"
        )
    if extra_heads:
        warnings.warn(f"{path}: skipping heads the architecture lacks: {_first(extra_heads)}", stacklevel=2)
    regressor.load_state_dict({k: state[k] for k in expected}, strict=True)


def freeze_normalisers(regressor: torch.nn.Module) -> None:
    """Stop every orb-models ``ScalarNormalizer`` from updating its statistics in training mode."""
    from orb_models.forcefield.nn_util import ScalarNormalizer

    for module in regressor.modules():
        if isinstance(module, ScalarNormalizer):
            module.online = False


def _set_normaliser(normaliser: torch.nn.Module, mean: float, std: float) -> None:
    normaliser.bn.running_mean.fill_(mean)
    normaliser.bn.running_var.fill_(max(std, 1e-4) ** 2)


class OrbPotential(Potential):
    """ORB v3 potential with optional BLIP noise on its interaction MLPs.

    Args:
        elements: atomic numbers the inference network knows, in species-index order.
        config: base model (:class:`OrbConfig`); its weights file is read here, before wrapping.
        bayes: BLIP settings (None: the deterministic base model); default patterns
            :data:`EDGE_PATTERN` and :data:`NODE_PATTERN` when the config leaves them None.
    """

    backend = "orb"
    implements_descriptors = True

    def __init__(self, elements: list[int], config: OrbConfig = OrbConfig(), bayes: BayesConfig | None = None):
        if bayes is not None and getattr(bayes, "method", "blip") != "blip":
            raise ValueError(f"the ORB backend implements BLIP only, not bayes.method={bayes.method!r}")
        config = config.resolved()
        super().__init__(elements, bayes, cutoff=config.radius)  # scale: unused, ORB normalises in its heads
        self.config = config
        self.net = build_regressor(self.config)
        if self.config.weights_path is not None:
            load_base_weights(self.net, self.config.weights_path)
        freeze_normalisers(self.net)
        self.system_config = self.net.system_config
        if bayes is not None:
            self.make_bayesian(self.net, edge_pattern=EDGE_PATTERN, node_pattern=NODE_PATTERN)

    @property
    def conservative(self) -> bool:
        return self.config.kind == "conservative"

    @property
    def implements_stress(self) -> bool:  # type: ignore[override]
        return self.conservative or "stress" in self.net.heads

    @property
    def alpha_needs_jacobian(self) -> bool:  # type: ignore[override]
        """Direct forces come from a head: no derivative of alpha is needed."""
        return self.conservative

    def config_dict(self) -> dict:
        return {"elements": self.elements, "orb": asdict(self.config), "bayes": self.bayes and asdict(self.bayes)}

    @classmethod
    def from_config(cls, config: dict) -> OrbPotential:
        """Rebuild the architecture of a checkpoint (weights come from its state_dict, so the
        base weights file is not read again)."""
        orb = OrbConfig(**{**config["orb"], "weights_path": None})
        bayes = config.get("bayes")
        return cls(config["elements"], orb, BayesConfig(**bayes) if bayes else None)

    def build_graph(self, atoms: Atoms) -> OrbGraph:
        """orb-models graph of one structure on the model's device and dtype."""
        from blip_ase.models.orb_graph import atoms_to_orb_graph

        return atoms_to_orb_graph(
            atoms, system_config=self.system_config, elements=self.elements, device=self.device, dtype=self.dtype
        )

    def batch(self, graphs: list[OrbGraph]) -> OrbGraph:
        """:meth:`Potential.batch` with orb-models' own batching."""
        from blip_ase.models.orb_graph import batch_orb_graphs

        return batch_orb_graphs(graphs)

    def make_dataset(self, frames: list[Atoms], *, use_stress: bool = False, name: str = "data") -> GraphDataset:
        """Labelled orb-models graphs of ``frames`` for training."""
        from blip_ase.data.dataset import GraphDataset
        from blip_ase.models.orb_graph import atoms_to_orb_graph, batch_orb_graphs

        def to_graph(atoms: Atoms) -> OrbGraph:
            return atoms_to_orb_graph(atoms, system_config=self.system_config, elements=self.elements)

        return GraphDataset(frames, to_graph=to_graph, collate=batch_orb_graphs, use_stress=use_stress, name=name)

    def posterior_inputs(self, graph: OrbGraph) -> PosteriorInputs:
        """:meth:`Potential.posterior_inputs`. orb-models' edge vectors point from receiver to
        sender's opposite (``r_receiver - r_sender``); the inference network's convention is
        ``r_sender - r_receiver``, as for PaiNN, so they are negated here."""
        n_node = graph.graphs.n_node
        atom_graph = torch.repeat_interleave(torch.arange(len(n_node), device=n_node.device), n_node)
        vectors = -graph.graphs.edge_features["vectors"]
        return PosteriorInputs(graph.species, graph.edge_index(), vectors, atom_graph, len(n_node))

    @torch.no_grad()
    def descriptors(self, graph: OrbGraph) -> torch.Tensor:
        """:meth:`Potential.descriptors`: the node features after the last message-passing step
        ``(N, latent_dim)``, MAP (no noise). Translation invariant; ORB v3 is not rotation
        equivariant by design, so they are rotation invariant only approximately."""
        return self.net.model(graph.graphs)["node_features"]

    @torch.no_grad()
    def fit_normalisation(self, frames: list[Atoms], energies: np.ndarray, forces: np.ndarray) -> None:
        """Fit reference energies and normaliser statistics of a randomly initialised model, and
        zero its energy readout layer.

        A model loaded from a weights file keeps its own (pretrained statistics are part of it).

        Args:
            frames: training structures; energies: ``(F,)`` eV; forces: ``(sum n, 3)`` eV/A.
        """
        if self.config.weights_path is not None:
            return
        heads = self.net.heads
        # Zero the energy head's output layer, so the untrained model starts at the fitted
        # reference energies instead of energies tens of eV off, whose gradients would swamp the
        # force term.
        readout = [m for m in heads["energy"].mlp.modules() if isinstance(m, torch.nn.Linear)][-1]
        readout.weight.zero_()
        readout.bias.zero_()
        ref, residual, rms = energy_statistics(frames, energies, forces, self.elements)
        weight = heads["energy"].reference.linear.weight.view(-1)  # one column per atomic number
        weight.zero_()
        for z, e in zip(self.elements, ref):
            weight[z] = float(e)
        # Per-atom energy scale = RMS force (x 1 A), as for PaiNN: the residual's spread alone can
        # be far too small to give an untrained network forces of the right size.
        _set_normaliser(heads["energy"].normalizer, float(residual.mean()), max(rms, float(residual.std())))
        if "forces" in heads:
            _set_normaliser(heads["forces"].normalizer, 0.0, rms)
        if "stress" in heads:
            stress = np.array([a.get_stress() for a in frames if a.calc is not None and "stress" in a.calc.results])
            if len(stress):
                _set_normaliser(heads["stress"].diag_normalizer, float(stress[:, :3].mean()), float(stress[:, :3].std()))
                _set_normaliser(heads["stress"].offdiag_normalizer, 0.0, float(np.sqrt(np.mean(stress[:, 3:] ** 2))))

    def forward(  # the signature of Potential.forward
        self, graph: OrbGraph, *, coefficients: Coefficients | None = None, noise: NoiseSource | None = None,
        compute_forces: bool = True, compute_stress: bool = False, create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """:meth:`Potential.forward`. A direct model always returns forces (its head predicts
        them) and raises ``ValueError`` if asked for stress without a stress head; a
        conservative one differentiates its energy."""
        from blip_ase.models.orb_graph import replicate

        sampling = noise is not None and coefficients is not None
        n_samples = noise.n_samples if sampling else 1
        batch = replicate(graph, n_samples).graphs
        if compute_stress and not self.implements_stress:
            raise ValueError("this direct ORB model has no stress head (has_stress: false)")
        coefficients = coefficients.repeat(n_samples) if sampling else None
        noise = noise if sampling else None
        if self.conservative:
            energy, forces, stress = self._conservative(
                batch, coefficients, noise, compute_forces, compute_stress, create_graph
            )
        else:
            with noise_context(self.net, coefficients, noise):
                energy, forces, stress = self._direct(batch, compute_stress)
        g = graph.n_graphs
        out = {"energy": energy.view(n_samples, g)}
        if compute_forces:
            out["forces"] = forces.view(n_samples, -1, 3)
        if compute_stress:
            out["stress"] = stress.view(n_samples, g, 3, 3)
        return out

    def _direct(self, batch, compute_stress: bool):
        """Energy ``(S*G,)``, forces ``(S*N, 3)`` and stress ``(S*G, 3, 3)`` from the heads."""
        net = self.net
        out = net(batch)  # normalised head outputs, pair repulsion included
        energy = net.heads["energy"].denormalize(out["energy"], batch)
        forces = net.heads["forces"].denormalize(out["forces"], batch)
        stress = None
        if compute_stress:
            stress = voigt_to_matrix(net.heads["stress"].denormalize(out["stress"], batch))
        return energy, forces, stress

    def _conservative(self, batch, coefficients, noise, compute_forces: bool, compute_stress: bool, create_graph: bool):
        """Energy ``(S*G,)``; forces ``-dE/dr`` and stress ``(1/V) dE/d(strain)`` by one backward
        (alpha carries its derivative with respect to the edge vectors, so a sample's forces
        are the full derivative of its energy)."""
        net = self.net
        positions = batch.node_features["positions"].detach().requires_grad_(compute_forces)
        cell = batch.system_features["cell"]
        node_graph = torch.repeat_interleave(torch.arange(len(batch.n_node), device=cell.device), batch.n_node)
        edge_graph = torch.repeat_interleave(torch.arange(len(batch.n_edge), device=cell.device), batch.n_edge)
        inputs = [positions] if compute_forces else []
        if compute_stress:
            strain = torch.zeros_like(cell, requires_grad=True)
            sym = 0.5 * (strain + strain.transpose(-1, -2))
            positions = positions + torch.einsum("ni,nij->nj", positions, sym[node_graph])
            cell = cell + torch.bmm(cell, sym)
            inputs.append(strain)
        shifts = torch.einsum("ei,eij->ej", batch.edge_features["unit_shifts"], cell[edge_graph])
        vectors = positions[batch.receivers] - positions[batch.senders] + shifts
        batch = batch._replace(
            node_features={**batch.node_features, "positions": positions},
            edge_features={**batch.edge_features, "vectors": vectors},
        )
        head = net.heads["energy"]
        if coefficients is not None:  # in the inference network's sign convention (posterior_inputs)
            coefficients = coefficients.edge_at(-vectors)
        with noise_context(net, coefficients, noise):
            energy = head.denormalize(head(net.model(batch)["node_features"], batch), batch)
        if net.pair_repulsion:
            energy = energy + net.pair_repulsion_fn(batch)["energy"]
        forces = stress = None
        if inputs:
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph)
            if compute_forces:
                forces = -grads[0]
            if compute_stress:
                volume = torch.linalg.det(batch.system_features["cell"]).abs()
                stress = grads[-1] / volume[:, None, None]
        return energy, forces, stress
