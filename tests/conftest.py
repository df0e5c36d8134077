"""Shared small fixtures: tiny float64 PaiNN potentials and a few structures.

Every model here is small enough that a forward and backward pass takes milliseconds, so the
finite-difference and consistency tests can afford many evaluations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from blip_ase.bayes import BayesConfig
from blip_ase.models import PaiNNConfig, PaiNNPotential

ELEMENTS = [1, 7, 42]  # H, N, Mo
TINY_PAINN = PaiNNConfig(n_features=8, n_interactions=2, n_rbf=6, cutoff=4.0)
# p_init = 0.2 (alpha = 0.25) so that samples visibly differ from MAP and from each other.
TINY_BAYES = BayesConfig(p0=0.5, p_min=0.0, p_max=0.8, p_init=0.2, hidden=8, n_hidden=1, n_rbf=6)


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """Tiny models run fastest on one thread; several threads on a busy machine spin and crawl."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_potential(
    bayes: BayesConfig | None = TINY_BAYES, *, config: PaiNNConfig = TINY_PAINN, seed: int = 0, spread: bool = True
) -> PaiNNPotential:
    """A float64 PaiNN potential on ``ELEMENTS`` with weights fixed by ``seed``.

    With ``spread`` the inference network's output layers get random weights, so alpha and
    beta differ between edges and nodes (at initialisation they are all ``p_init/(1-p_init)``).
    The global torch RNG is left untouched.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PaiNNPotential(ELEMENTS, config, bayes)
        if spread and model.posterior is not None:
            for head in (model.posterior.edge_head, model.posterior.node_head):
                torch.nn.init.normal_(head[-1].weight, std=0.5)
    return model.to(torch.float64).eval()


@pytest.fixture
def make_potential() -> Callable[..., PaiNNPotential]:
    """Factory ``make_potential(bayes=TINY_BAYES, *, config=TINY_PAINN, seed=0, spread=True)``.

    ``bayes=None`` gives the deterministic model with plain linears.
    """
    return build_potential


@pytest.fixture
def bayesian_potential() -> PaiNNPotential:
    """Tiny Bayesian float64 PaiNN whose alpha/beta vary per edge/node around 0.25."""
    return build_potential()


@pytest.fixture
def ammonia() -> Atoms:
    """NH3, slightly distorted so that no symmetry hides an error."""
    atoms = molecule("NH3")
    atoms.rattle(stdev=0.05, seed=1)
    return atoms


@pytest.fixture
def mo_cell() -> Atoms:
    """16-atom periodic bcc Mo cell (a = 3.147 A), rattled and slightly sheared."""
    atoms = bulk("Mo", "bcc", a=3.147, cubic=True) * (2, 2, 2)
    shear = np.eye(3) + [[0.01, 0.02, 0.0], [0.0, -0.01, 0.015], [0.0, 0.0, 0.005]]
    atoms.set_cell(atoms.cell.array @ shear, scale_atoms=True)
    atoms.rattle(stdev=0.05, seed=2)
    return atoms


@pytest.fixture
def mixed_molecule() -> Atoms:
    """A small non-periodic cluster with all three elements (MoNH2-like)."""
    return Atoms(
        "MoNHH",
        positions=[[0.0, 0.0, 0.0], [1.9, 0.1, 0.0], [2.4, 0.9, 0.2], [2.5, -0.7, -0.1]],
    )


@pytest.fixture
def rotation() -> np.ndarray:
    """A random proper rotation matrix (det = +1), fixed by a seed."""
    rng = np.random.default_rng(3)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


TINY_REFERENCE = {
    "data": "synthetic",
    "quantiles": [0.5, 0.9, 0.95, 0.99, 1.0],
    "force_error": {key: [0.05, 0.1, 0.15, 0.18, 0.3] for key in ("all", "H", "N")},
    "force_std": {key: [0.05, 0.1, 0.15, 0.21, 0.3] for key in ("all", "H", "N")},
    "n_atoms": {"all": 40, "H": 30, "N": 10},
}
"""A synthetic calibration reference: ``blip md``'s default calibrated thresholds (1.4 and 5.6 x q99)
resolve on it to 0.252 and 1.008 eV/A for every element, close to the earlier absolute 0.25 and 1.0."""


def save_tiny_checkpoint(path, *, dtype: torch.dtype = torch.float32, reference: dict | None = TINY_REFERENCE):
    """Checkpoint of a tiny random Bayesian PaiNN for H and N (fast; forces are smooth) at ``path``,
    with ``reference`` as if ``blip calibrate`` had stored it (None: an uncalibrated model)."""
    from blip_ase.models.checkpoint import save_checkpoint

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = PaiNNPotential([1, 7], PaiNNConfig(n_features=16, n_interactions=2), BayesConfig(p_init=0.1))
    save_checkpoint(path, model.to(dtype), reference=reference)
    return path


def load_script(name: str):
    """The module of ``md_scripts/<name>.py`` (benchmark scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "md_scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
