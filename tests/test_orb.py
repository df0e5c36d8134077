"""ORB v3 backend: BLIP wrapping of orb-models, weights files, fine-tuning, calculator and MD.

Models are small randomly initialised ORB v3 architectures (pretrained weights cannot be
downloaded here); loading a weights file is tested with a state_dict saved by the test.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.io import read, write

from blip_ase.bayes import BayesianLinear, NoiseSource
from blip_ase.models import BACKENDS, load_checkpoint, save_checkpoint
from blip_ase.models.orb import ORB_BAYES, OrbConfig, OrbPotential, build_regressor
from blip_ase.models.orb_graph import atoms_to_orb_graph
from blip_ase.training import load_config, train
from blip_ase.training.loop import build_model, evaluate_map, fit_normalisation
from blip_ase.voigt import matrix_to_voigt


REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "tests" / "data"
ISSUE_PATTERN = r"^model\.gnn_stacks\.\d+\._(node_mlp|edge_mlp)\.mlp\.NN-\d+$"
KINDS = ["direct", "conservative"]
# max_num_neighbors 120 keeps every neighbour within the radius, so finite differences never
# cross a change of the k-nearest-neighbour graph.
SMALL = dict(latent_dim=32, base_mlp_hidden_dim=64, head_mlp_hidden_dim=32, num_message_passing_steps=2)
ELEMENTS = [1, 7, 42]


def small_config(kind: str, **kwargs) -> OrbConfig:
    return OrbConfig(kind=kind, **{**SMALL, "max_num_neighbors": 120, **kwargs})


def make_orb(kind: str, bayes=ORB_BAYES, *, seed: int = 0, **kwargs) -> OrbPotential:
    """A float64 ORB potential whose inference network gives every edge/node its own alpha."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = OrbPotential(ELEMENTS, small_config(kind, **kwargs), bayes)
        if model.posterior is not None:
            for head in (model.posterior.edge_head, model.posterior.node_head):
                torch.nn.init.normal_(head[-1].weight, std=0.5)
    return model.double().eval()


def mo_cell():
    atoms = bulk("Mo", "bcc", a=3.15, cubic=True) * (2, 2, 2)
    atoms.rattle(stdev=0.05, seed=2)
    return atoms


def raw_prediction(regressor, atoms, kind: str) -> dict[str, torch.Tensor]:
    """orb-models' own prediction (no BLIP code in the path): energy, forces, stress (Voigt)."""
    graph = atoms_to_orb_graph(atoms, system_config=regressor.system_config, elements=ELEMENTS, dtype=torch.float64)
    out = regressor.eval().predict(graph.graphs)
    prefix = "" if kind == "direct" else "grad_"
    return {"energy": out["energy"], "forces": out[f"{prefix}forces"], "stress": out[f"{prefix}stress"]}


@pytest.mark.parametrize("kind", KINDS)
def test_wrapping_keeps_the_base_state_dict_keys_and_wraps_exactly_the_interaction_mlps(kind):
    plain = build_regressor(small_config(kind))
    model = make_orb(kind)
    assert list(model.net.state_dict()) == list(plain.state_dict())
    wrapped = [name for name, m in model.net.named_modules() if isinstance(m, BayesianLinear)]
    expected = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and re.match(ISSUE_PATTERN, n)]
    assert wrapped and sorted(wrapped) == sorted(expected)
    edge = [n for n in wrapped if "_edge_mlp" in n]
    assert all(model.net.get_submodule(n).role == "edge" for n in edge)
    assert model.posterior.n_edge_layers == len(edge) == 2 * 3 and model.posterior.n_node_layers == 6


@pytest.mark.parametrize("kind", KINDS)
def test_a_weights_file_gives_the_same_predictions_before_wrapping_and_in_map_mode_after(kind, tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(7)
        base = build_regressor(small_config(kind))
    path = tmp_path / "base.ckpt"
    torch.save(base.state_dict(), path)
    atoms = mo_cell()
    ref = raw_prediction(base.double(), atoms, kind)
    for bayes in (None, ORB_BAYES):
        model = make_orb(kind, bayes, seed=123, weights_path=str(path))
        out = model(model.build_graph(atoms), compute_stress=True)
        torch.testing.assert_close(out["energy"][0], ref["energy"], rtol=0, atol=1e-10)
        torch.testing.assert_close(out["forces"][0], ref["forces"], rtol=0, atol=1e-10)
        torch.testing.assert_close(matrix_to_voigt(out["stress"][0]), ref["stress"], rtol=0, atol=1e-10)


def test_a_weights_file_of_another_architecture_names_the_first_mismatched_keys(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save(build_regressor(small_config("direct", latent_dim=48)).state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatches: heads\.energy\.mlp\.NN-0\.weight \(32, 48\) in file vs \(32, 32\)"):
        OrbPotential(ELEMENTS, small_config("direct", weights_path=str(path)))
    state = build_regressor(small_config("direct")).state_dict()
    del state["model.gnn_stacks.1._edge_mlp.mlp.NN-0.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys: model\.gnn_stacks\.1\._edge_mlp\.mlp\.NN-0\.weight"):
        OrbPotential(ELEMENTS, small_config("direct", weights_path=str(path)))
    with pytest.raises(ValueError, match=r"unexpected keys: model\.gnn_stacks\.1\._node_mlp\.mlp\.NN-0\.weight"):
        OrbPotential(ELEMENTS, small_config("direct", num_message_passing_steps=1, weights_path=str(path)))


def test_mixed_periodic_boundary_conditions_fail_clearly():
    atoms = mo_cell()
    atoms.pbc = [True, True, False]
    with pytest.raises(ValueError, match=r"ORB v3 supports only fully periodic or fully non-periodic .*pbc=\[True, True, False\]"):
        make_orb("direct").build_graph(atoms)


def test_normaliser_statistics_stay_frozen_in_training_mode():
    model = make_orb("direct").train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "normalizer" in k}
    graph = model.build_graph(mo_cell())
    out = model(graph, coefficients=model.coefficients(graph), noise=NoiseSource.from_seeds([0]), compute_stress=True)
    (out["energy"].sum() + out["forces"].sum() + out["stress"].sum()).backward()
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())


def test_orb_is_registered_lazily_and_checkpoints_round_trip(tmp_path):
    assert "orb" in BACKENDS and BACKENDS["orb"] is OrbPotential
    model = make_orb("conservative")
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["backend"] == "orb" and list(loaded.state_dict()) == list(model.state_dict())
    graph = model.build_graph(mo_cell())
    torch.testing.assert_close(loaded(loaded.build_graph(mo_cell()))["forces"], model(graph)["forces"])


# --- fine-tuning with blip train, then the calculator and blip md on the result -------------------


@pytest.fixture(scope="module")
def mo_split(tmp_path_factory):
    frames = read(DATA_DIR / "mo_small.extxyz", ":")
    out = tmp_path_factory.mktemp("mo")
    for split in ("train", "val"):
        write(out / f"{split}.extxyz", [a for a in frames if a.info["split"] == split])
    return out


@pytest.fixture(scope="module")
def fine_tuned(mo_split, tmp_path_factory):
    """The shipped examples/orb/config.yaml, 8 epochs on 10 Mo cells (about 5 s)."""
    cfg = load_config(REPO_ROOT / "examples" / "orb" / "config.yaml", epochs=8, progress=False)
    out = tmp_path_factory.mktemp("orb_run")
    summary = train(cfg, mo_split / "train.extxyz", mo_split / "val.extxyz", out)
    return cfg, summary, out


def test_fine_tuning_on_mo_lowers_the_validation_force_mae(fine_tuned, mo_split):
    cfg, summary, _ = fine_tuned
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        start_model = build_model(cfg, [42])
    fit_normalisation(start_model, start_model.make_dataset(read(mo_split / "train.extxyz", ":")))
    val = start_model.make_dataset(read(mo_split / "val.extxyz", ":"))
    start = evaluate_map(start_model.eval(), val, cfg, torch.device("cpu"), torch.float32)["forces_mae"]
    # measured: 0.656 -> 0.383 eV/A after 8 epochs
    assert summary["val"]["forces_mae"] < 0.75 * start


def test_calculator_runs_with_the_orb_backend(fine_tuned):
    from blip_ase.calculator import BLIPCalculator

    calc = BLIPCalculator.from_checkpoint(fine_tuned[2] / "model.pt", n_samples=4, seed=0)
    atoms = mo_cell()
    atoms.calc = calc
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    assert np.isfinite(energy) and forces.shape == (16, 3) and stress.shape == (6,)
    assert calc.results["forces_variance"].shape == (16,) and (calc.results["forces_variance"] > 0).all()
    again = BLIPCalculator.from_checkpoint(fine_tuned[2] / "model.pt", n_samples=4, seed=0)
    assert again.get_potential_energy(mo_cell()) == energy


def test_nvt_blip_md_runs_with_the_orb_backend(fine_tuned, tmp_path):
    from blip_ase.cli.main import main as blip

    structure = tmp_path / "mo.extxyz"
    write(structure, mo_cell())
    out = tmp_path / "md"
    args = ["md", "--model", str(fine_tuned[2] / "model.pt"), "--structure", str(structure), "--out", str(out)]
    args += ["--ensemble", "nvt-langevin", "--steps", "6", "--uq-interval", "3", "--n-samples", "3"]
    args += ["--temperature-K", "300", "--no-progress", "--no-plot", "--traj-interval", "3"]
    args += ["--flag-force-std-eV-per-A", "0.25", "--halt-force-std-eV-per-A", "1.0"]  # not calibrated: no reference
    assert blip(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(read(out / "md.traj", ":")) >= 2
    assert summary["status"] == "completed" and summary["n_checked"] >= 2


def test_importing_blip_ase_models_does_not_import_orb_models():
    import subprocess

    code = "import sys, blip_ase.models, blip_ase.training; print('orb_models' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_molecule_runs_without_stress():
    model = make_orb("direct")
    out = model(model.build_graph(molecule("NH3")))
    assert out["forces"].shape == (1, 4, 3) and "stress" not in out


def test_config_round_trip_rebuilds_the_same_architecture():
    model = make_orb("direct")
    rebuilt = OrbPotential.from_config(model.config_dict())
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    assert dataclasses.asdict(rebuilt.config) == {**dataclasses.asdict(model.config), "weights_path": None}
