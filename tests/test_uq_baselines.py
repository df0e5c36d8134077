"""What is specific to the baselines (MC dropout masks, ensemble members, checkpoints, training,
bad input) and a few checks run on every kind. The calculator test suite itself
(tests/test_calculator.py) runs on BLIP, MC dropout and ensembles alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.md.verlet import VelocityVerlet

from blip_ase import BLIPCalculator
from blip_ase.bayes import BayesConfig, DropoutLinear, NoiseSource, dropoutize
from blip_ase.models import PaiNNConfig, PaiNNPotential, load_checkpoint, save_checkpoint
from blip_ase.models.ensemble import EnsemblePotential

KINDS = ["blip", "mc_dropout", "ensemble"]
MC_KEYS = {"energy", "free_energy", "forces", "energy_variance", "forces_variance"}
DROPOUT = BayesConfig(method="mc_dropout", dropout_p=0.2)
N_MEMBERS = 3
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ammonia"


def build(kind: str, make_potential):
    """A tiny float64 model of each kind on H, N, Mo (conftest's ``make_potential``)."""
    if kind == "blip":
        model = make_potential()
    elif kind == "mc_dropout":
        model = make_potential(DROPOUT)
    else:
        model = EnsemblePotential([make_potential(None, seed=k) for k in range(N_MEMBERS)])
    with torch.no_grad():  # nonzero reference energies, as in test_calculator
        for m in model.members if kind == "ensemble" else [model]:
            m.reference_energies.copy_(-torch.arange(1.0, 4.0, dtype=torch.float64))
    return model.eval()


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def model(kind, make_potential):
    return build(kind, make_potential)


@pytest.fixture
def nh3() -> Atoms:
    atoms = molecule("NH3")
    atoms.rattle(0.05, seed=3)
    return atoms


# --- the calculator tests of BLIP, for every kind ----------------------------------------------


def test_a_checkpoint_round_trip_gives_identical_results_and_loads_weights_only(model, nh3, tmp_path):
    save_checkpoint(tmp_path / "model.pt", model, calibration={"forces": 2.0})
    torch.load(tmp_path / "model.pt", weights_only=True)
    loaded = BLIPCalculator.from_checkpoint(tmp_path / "model.pt", n_samples=4, seed=9, device="cpu")
    assert loaded.model.backend == model.backend and loaded.calibration["forces"] == 2.0
    direct = BLIPCalculator(model, n_samples=4, seed=9, calibration={"forces": 2.0})
    a, b = loaded.monte_carlo(nh3), direct.monte_carlo(nh3)
    np.testing.assert_array_equal(a["forces"], b["forces"])
    np.testing.assert_array_equal(a["forces_variance"], b["forces_variance"])


def test_uncertainty_monitored_md_runs_with_every_kind(model, nh3):
    from blip_ase.md import UncertaintyMonitor

    nh3.calc = BLIPCalculator(model, mode="map", n_samples=4, seed=0)
    dyn = VelocityVerlet(nh3, timestep=0.5)
    monitor = UncertaintyMonitor(dyn)
    dyn.attach(monitor, interval=2)
    dyn.run(4)
    assert monitor.n_checked == 3
    assert all(np.isfinite(h["max_force_std"]) and h["max_force_std"] > 0 for h in monitor.history)


# --- MC dropout --------------------------------------------------------------------------------


def test_dropout_wraps_the_blip_layers_and_keeps_the_state_dict_of_the_plain_model(make_potential):
    model, plain = make_potential(DROPOUT), make_potential(None)
    wrapped = [n for n, m in model.net.named_modules() if isinstance(m, DropoutLinear)]
    assert wrapped and all(("context_net" in n) or ("update_net" in n) for n in wrapped)
    assert model.posterior is None and model.state_dict().keys() == plain.state_dict().keys()


def test_dropout_masks_drop_a_fraction_p_of_inputs_and_rescale_the_rest():
    linear = torch.nn.Linear(400, 1, bias=False)
    torch.nn.init.ones_(linear.weight)
    container = torch.nn.Sequential(linear)
    dropoutize(container, edge_pattern="0", node_pattern="none", p=0.25)
    layer = container[0]
    layer.noise = NoiseSource.from_seeds([0])
    out = layer(torch.ones(500, 400, dtype=torch.float32))  # (#kept inputs) / 0.75 per row
    kept_fraction = (out * 0.75 / 400).mean().item()
    assert kept_fraction == pytest.approx(0.75, abs=0.005)  # 200000 Bernoulli draws: std 0.001
    layer.noise = None
    torch.testing.assert_close(layer(torch.ones(2, 400)), torch.full((2, 1), 400.0))


def test_zero_dropout_gives_samples_equal_to_map_and_a_bad_rate_is_rejected(make_potential, nh3):
    model = make_potential(BayesConfig(method="mc_dropout", dropout_p=0.0))
    r = BLIPCalculator(model, n_samples=3, seed=0).monte_carlo(nh3)
    nh3.calc = BLIPCalculator(model, mode="map")
    np.testing.assert_allclose(r["forces"], nh3.get_forces(), atol=1e-12)
    # equal samples up to float64 rounding: with index_add in PaiNN the copies of a batched pass
    # differ by ~1e-17 eV/A (variance 6e-33 seen); any dropped unit gives a variance above 1e-6
    assert np.all(r["forces_variance"] < 1e-24)
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        make_potential(BayesConfig(method="mc_dropout", dropout_p=1.0))


# --- deep ensemble -----------------------------------------------------------------------------


def test_ensemble_samples_are_its_members_and_its_statistics_those_of_the_members(make_potential, nh3):
    model = build("ensemble", make_potential)
    per_member = []
    for member in model.members:
        nh3.calc = BLIPCalculator(member, mode="map")
        per_member.append((nh3.get_potential_energy(), nh3.get_forces()))
    energies = np.array([e for e, _ in per_member])
    forces = np.stack([f for _, f in per_member])
    r = BLIPCalculator(model, n_samples=N_MEMBERS, seed=0, keep_samples=True).monte_carlo(nh3)
    np.testing.assert_allclose(r["energy_samples"], energies, atol=1e-12)
    assert r["energy_variance"] == pytest.approx(energies.var(ddof=1), rel=1e-10)
    np.testing.assert_allclose(r["forces_variance"], forces.var(0, ddof=1).sum(-1), rtol=1e-10)
    nh3.calc = BLIPCalculator(model, mode="map")  # MAP: the members' mean
    assert nh3.get_potential_energy() == pytest.approx(energies.mean(), abs=1e-12)
    # any n_samples gives exactly one sample per member: repeats would bias the variance
    other = BLIPCalculator(model, n_samples=7, seed=0, keep_samples=True).monte_carlo(nh3)
    np.testing.assert_allclose(other["energy_samples"], energies, atol=1e-12)
    assert other["energy_variance"] == pytest.approx(energies.var(ddof=1), rel=1e-10)


def test_ensemble_members_must_agree_on_elements_and_backend(make_potential):
    h_n = PaiNNPotential([1, 7], PaiNNConfig(n_features=8, n_interactions=1, n_rbf=6, cutoff=4.0))
    expected = r"disagree on the elements: member 0 knows \[1, 7, 42\], member 1 knows \[1, 7\]"
    with pytest.raises(ValueError, match=expected):
        EnsemblePotential([make_potential(None), h_n])

    class Other(PaiNNPotential):
        backend = "orb"

    other = Other([1, 7, 42], PaiNNConfig(n_features=8, n_interactions=1, n_rbf=6, cutoff=4.0))
    with pytest.raises(ValueError, match=r"disagree on the backend: \['painn', 'orb'\]"):
        EnsemblePotential([make_potential(None), other])
    with pytest.raises(ValueError, match="at least 2 members"):
        EnsemblePotential([make_potential(None)])


def test_blip_train_ensemble_trains_seeded_members_and_writes_an_ensemble_checkpoint(tmp_path):
    from blip_ase.cli.main import main as blip

    (tmp_path / "config.yaml").write_text(
        "painn: {n_features: 8, n_interactions: 1, n_rbf: 6, cutoff: 4.0}\n"
        "deterministic: true\nepochs: 2\nbatch_size: 32\nseed: 5\nprogress: false\n"
    )
    args = ["train", str(tmp_path / "config.yaml"), "--train", str(EXAMPLE / "val.extxyz"),
            "--val", str(EXAMPLE / "val.extxyz"), "--out", str(tmp_path / "run"), "--ensemble", "2"]
    assert blip(args) == 0
    model, ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt["backend"] == "ensemble" and model.n_members == 2 and ckpt["elements"] == [1, 7]
    seeds = [load_checkpoint(tmp_path / "run" / f"member_{k}" / "model.pt")[1]["training"]["config"]["seed"]
             for k in range(2)]
    assert seeds == [5, 6]
    assert not torch.equal(model.members[0].net.embedding.weight, model.members[1].net.embedding.weight)


def test_mc_dropout_training_uses_masks_and_no_kl(tmp_path):
    from blip_ase.training import load_config, train

    (tmp_path / "config.yaml").write_text(
        "painn: {n_features: 8, n_interactions: 1, n_rbf: 6, cutoff: 4.0}\n"
        "bayes: {method: mc_dropout, dropout_p: 0.1}\nepochs: 2\nbatch_size: 32\nprogress: false\n"
    )
    train(load_config(tmp_path / "config.yaml"), EXAMPLE / "val.extxyz", EXAMPLE / "val.extxyz", tmp_path / "run")
    model, ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt["config"]["bayes"]["method"] == "mc_dropout" and model.posterior is None
    assert any(isinstance(m, DropoutLinear) for m in model.modules())
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    kl = log[0].split(",").index("train_kl")
    assert all(float(row.split(",")[kl]) == 0.0 for row in log[1:])
