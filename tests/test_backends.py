"""The backend contract: the :class:`Potential` ABC, one edge-vector convention, and the shipped
battery (:mod:`blip_ase.testing`) run for every backend: PaiNN (BLIP), MC dropout, the deep
ensemble and ORB v3 (conservative and direct). Backend-specific behaviour stays in
test_painn.py, test_orb.py and test_uq_baselines.py."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from blip_ase import testing
from blip_ase.bayes import BayesConfig
from blip_ase.models import PaiNNConfig, PaiNNPotential, Potential
from blip_ase.models.ensemble import EnsemblePotential
from blip_ase.models.orb import ORB_BAYES, OrbConfig, OrbPotential, build_regressor
from blip_ase.models.orb_graph import atoms_to_orb_graph

TINY_ORB = OrbConfig(
    kind="conservative", latent_dim=16, base_mlp_hidden_dim=16, base_mlp_depth=1, head_mlp_hidden_dim=16,
    head_mlp_depth=1, num_message_passing_steps=2, radius=4.0, max_num_neighbors=12,
)  # fmt: skip


def test_potential_is_an_abstract_base_class_declaring_what_callers_use():
    """A third backend's author gets a declared interface: leaving out a method is an error at
    construction, not an AttributeError deep inside the calculator."""
    assert Potential.__abstractmethods__ == {"from_config", "config_dict", "build_graph", "forward"}
    with pytest.raises(TypeError, match="abstract"):
        Potential([1], None, cutoff=4.0)

    class Incomplete(Potential):
        backend = "incomplete"

        def config_dict(self) -> dict:
            return {}

    with pytest.raises(TypeError, match="forward"):
        Incomplete([1], None, cutoff=4.0)
    model = PaiNNPotential([1, 7], PaiNNConfig(n_features=8, n_interactions=1, n_rbf=4), BayesConfig())
    assert model.sample_period == 1 and model.cutoff == 5.0 and model.scale.shape == ()
    assert model.posterior is not None and "scale" in dict(model.named_buffers())


@pytest.mark.parametrize("backend", ["painn", "orb"])
def test_the_inference_network_sees_sender_minus_receiver_edge_vectors_in_every_backend(backend):
    """PaiNN's graph used r_j - r_i and ORB's r_i - r_j while the inference network documents one
    convention; alpha of a non-invariant posterior (ORB's unit-vector input) depended on it."""
    atoms = molecule("NH3")
    torch.manual_seed(0)
    if backend == "painn":
        model = PaiNNPotential([1, 7], PaiNNConfig(n_features=8, n_interactions=1, n_rbf=4), BayesConfig())
    else:
        model = OrbPotential([1, 7], TINY_ORB, ORB_BAYES)
    x = model.posterior_inputs(model.build_graph(atoms))
    species, edge_index, vectors = x.species, x.edge_index, x.edge_vector
    positions = torch.as_tensor(atoms.positions, dtype=vectors.dtype)
    receiver, sender = edge_index
    assert len(species) == len(atoms) and edge_index.shape[1] > 0
    torch.testing.assert_close(vectors, positions[sender] - positions[receiver], rtol=0, atol=1e-5)
    assert np.isfinite(model.coefficients(model.build_graph(atoms)).edge.detach().numpy()).all()


# --- the battery, for every backend -------------------------------------------------------------

ELEMENTS = [1, 7, 42]
# max_num_neighbors 120 keeps every neighbour within the radius, so finite differences never
# cross a change of ORB's k-nearest-neighbour graph.
SMALL_ORB = dict(latent_dim=32, base_mlp_hidden_dim=64, head_mlp_hidden_dim=32, num_message_passing_steps=2)


def painn(bayes: BayesConfig | None = BayesConfig(hidden=8, n_hidden=1, n_rbf=6, p_init=0.2), seed: int = 0):
    """A tiny float64 PaiNN whose inference network gives every edge/node its own alpha."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PaiNNPotential(ELEMENTS, PaiNNConfig(n_features=8, n_interactions=2, n_rbf=6, cutoff=4.0), bayes)
        with torch.no_grad():
            model.reference_energies.copy_(-torch.arange(1.0, len(ELEMENTS) + 1))
            if model.posterior is not None:
                for head in (model.posterior.edge_head, model.posterior.node_head):
                    torch.nn.init.normal_(head[-1].weight, std=0.5)
    return model.double().eval()


def orb(kind: str, seed: int = 0, bayes: BayesConfig = ORB_BAYES) -> OrbPotential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = OrbPotential(ELEMENTS, OrbConfig(kind=kind, max_num_neighbors=120, **SMALL_ORB), bayes)
        for head in (model.posterior.edge_head, model.posterior.node_head):
            torch.nn.init.normal_(head[-1].weight, std=0.5)
    return model.double().eval()


def painn_plain(model: PaiNNPotential):
    """The deterministic PaiNN with the same weights (plain linears)."""
    plain = painn(None)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("posterior.")})
    return lambda atoms: testing.sample_outputs(plain, atoms, None)


def orb_plain(model: OrbPotential):
    """orb-models' own regressor with the same weights: no BLIP code in the path."""
    plain = build_regressor(model.config).double().eval()
    plain.load_state_dict(model.net.state_dict())
    prefix = "" if model.config.kind == "direct" else "grad_"

    def predict(atoms: Atoms) -> dict:
        graph = atoms_to_orb_graph(atoms, system_config=plain.system_config, elements=ELEMENTS, dtype=torch.float64)
        out = plain.predict(graph.graphs)
        ref = {"energy": out["energy"].reshape(1, 1), "forces": out[f"{prefix}forces"][None]}
        if atoms.pbc.all():
            from blip_ase.voigt import voigt_to_matrix

            ref["stress"] = voigt_to_matrix(out[f"{prefix}stress"]).reshape(1, 1, 3, 3)
        return {k: v.detach() for k, v in ref.items()}

    return predict


def ensemble_mean(model: EnsemblePotential):
    return lambda atoms: {
        key: torch.stack([testing.sample_outputs(m, atoms, None)[key] for m in model.members]).mean(dim=0)
        for key in testing.sample_outputs(model.members[0], atoms, None)
    }


@dataclass(frozen=True)
class Case:
    """A backend under test and what its contract promises."""

    name: str
    build: object
    reference: object  # model -> (atoms -> MAP outputs of the plain model)
    conservative: bool = True
    equivariant: bool = True
    stochastic: bool = True


NEIGHBOURHOOD = BayesConfig(hidden=8, n_hidden=1, n_rbf=6, p_init=0.2, neighbourhood=True)
CASES = [
    Case("painn", painn, painn_plain),
    # beta of an atom depends on all its edges: exact sample derivatives need the node Jacobian
    Case("painn-neighbourhood", lambda: painn(NEIGHBOURHOOD), painn_plain),
    Case("orb-conservative-neighbourhood", lambda: orb("conservative", bayes=replace(ORB_BAYES, neighbourhood=True)),
         orb_plain, equivariant=False),
    # alpha of an edge depends on every edge of both its atoms (environment features)
    Case("painn-environment", lambda: painn(replace(NEIGHBOURHOOD, environment=4)), painn_plain),
    Case("orb-conservative-environment", lambda: orb("conservative", bayes=replace(ORB_BAYES, environment=3)),
         orb_plain, equivariant=False),
    Case("mc_dropout", lambda: painn(BayesConfig(method="mc_dropout", dropout_p=0.2)), painn_plain),
    Case("ensemble", lambda: EnsemblePotential([painn(seed=0), painn(seed=1)]), ensemble_mean, stochastic=False),
    Case("orb-conservative", lambda: orb("conservative"), orb_plain, equivariant=False),
    Case("orb-direct", lambda: orb("direct"), orb_plain, conservative=False, equivariant=False),
]
CONSERVATIVE = [c for c in CASES if c.conservative]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param, request.param.build()


@pytest.fixture(scope="module", params=CONSERVATIVE, ids=lambda c: c.name)
def conservative(request):
    return request.param, request.param.build()


def small_molecule() -> Atoms:
    atoms = molecule("NH3")
    atoms.rattle(0.05, seed=3)
    return atoms


def small_cell() -> Atoms:
    """Two Mo atoms (a = 3.15 A) and one H, rattled, away from the cell faces."""
    atoms = bulk("Mo", "bcc", a=3.15) * (2, 1, 1)
    atoms.rattle(stdev=0.05, seed=1)
    atoms.translate(0.2 * atoms.cell.sum(axis=0))
    atoms.wrap()
    return atoms


@pytest.mark.parametrize("seed", [None, 11], ids=["map", "fixed-noise"])
def test_forces_are_minus_the_energy_gradient(conservative, seed):
    _, model = conservative
    testing.check_forces_match_finite_differences(model, small_molecule(), seed=seed)


@pytest.mark.parametrize("seed, recompute", [(None, False), (11, True)], ids=["map", "fixed-noise-alpha-recomputed"])
def test_forces_and_stress_of_a_periodic_cell_are_energy_derivatives(conservative, seed, recompute):
    """With alpha recomputed at every displaced geometry: the forces include d alpha / d r."""
    _, model = conservative
    testing.check_forces_match_finite_differences(model, small_cell(), seed=seed, recompute=recompute)
    testing.check_stress_matches_finite_differences(model, small_cell(), seed=seed, recompute=recompute)


def test_results_have_the_contract_keys_and_shapes(case):
    _, model = case
    testing.check_result_keys_and_shapes(model, small_molecule())
    testing.check_result_keys_and_shapes(model, small_cell())


def test_batched_samples_equal_sequential_passes_with_the_same_noise(case):
    _, model = case
    testing.check_batched_samples_equal_sequential(model, small_cell())


def test_same_seed_same_samples_and_another_seed_others(case):
    spec, model = case
    testing.check_seeds(model, small_cell(), stochastic=spec.stochastic)


def test_map_equals_the_plain_model(case):
    spec, model = case
    reference = spec.reference(model)
    testing.check_map_equals(model, small_molecule(), reference)
    testing.check_map_equals(model, small_cell(), reference)


def test_translation_and_rotation_act_as_the_model_promises(case, rotation):
    """Equivariant backends: exactly, per fixed-noise sample; ORB v3 is not rotation equivariant
    by design, so for it translation only."""
    spec, model = case
    for atoms in (small_molecule(), small_cell()):
        testing.check_rotation_and_translation(model, atoms, rotation=rotation if spec.equivariant else None)


def test_bad_inputs_are_refused_by_every_backend(case):
    _, model = case
    testing.check_bad_inputs(model, small_molecule())


def test_a_batch_of_structures_equals_each_structure_alone(case):
    """MAP outputs, and samples drawn with StructureNoise, do not depend on the batch-mates."""
    _, model = case
    cell = small_cell()
    testing.check_batched_structures_equal_separate(model, [small_molecule(), small_molecule(), cell][:2])
    testing.check_batched_structures_equal_separate(model, [cell, cell])


def test_descriptors_are_invariant_per_atom_features_that_batching_does_not_mix(case, rotation):
    """What active learning selects by (FPS, near-duplicates): the same for a moved structure,
    independent of batch-mates, for every backend (ORB v3 included: fps works for it)."""
    spec, model = case
    other = small_molecule()
    other.rattle(0.1, seed=5)
    testing.check_descriptors(model, [small_molecule(), other, small_cell()],
                              rotation=rotation if spec.equivariant else None)  # fmt: skip
