"""The backend contract: the :class:`Potential` ABC and one edge-vector convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

from blip_ase.bayes import BayesConfig
from blip_ase.models import PaiNNConfig, PaiNNPotential, Potential
from blip_ase.models.orb import ORB_BAYES, OrbConfig, OrbPotential

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
    species, edge_index, vectors = model.posterior_inputs(model.build_graph(atoms))
    positions = torch.as_tensor(atoms.positions, dtype=vectors.dtype)
    receiver, sender = edge_index
    assert len(species) == len(atoms) and edge_index.shape[1] > 0
    torch.testing.assert_close(vectors, positions[sender] - positions[receiver], rtol=0, atol=1e-5)
    assert np.isfinite(model.coefficients(model.build_graph(atoms)).edge.detach().numpy()).all()
