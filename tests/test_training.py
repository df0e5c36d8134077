"""Training, configuration, data readers and checkpoints (the foundation issue's end-to-end part)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from blip_ase.assets import ammonia_model
from blip_ase.bayes import NoiseSource
from blip_ase.cli.main import main as blip
from blip_ase.data.readers import read_frames, write_hdf5
from blip_ase.models import CheckpointError, load_checkpoint, save_checkpoint
from blip_ase.training import load_config, train
from blip_ase.training.config import with_overrides
from blip_ase.training.loop import build_model, train_step
from blip_ase.training.loss import variance_nll

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ammonia"

TINY_CONFIG = """
painn: {n_features: 32, n_interactions: 2, cutoff: 5.0}
bayes: {p0: 0.5, kl_weight: 10.0, p_max: 0.8, hidden: 32}
loss: {kind: l1, energy_weight: 0.1, forces_weight: 1.0}
optim: {lr: 3.0e-3, scheduler: plateau, plateau_patience: 30}
epochs: 60
batch_size: 16
seed: 0
progress: false
"""


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BLIP-PaiNN trained on the ammonia near-equilibrium split (about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("trained")
    (out / "config.yaml").write_text(TINY_CONFIG)
    summary = train(load_config(out / "config.yaml"), EXAMPLE / "train.extxyz", EXAMPLE / "val.extxyz", out / "run")
    return summary, out / "run"


def _val_forces_mae(log: Path) -> list[float]:
    with open(log) as fh:
        return [float(row["val_forces_mae"]) for row in csv.DictReader(fh)]


def test_training_on_ammonia_lowers_the_validation_force_mae_below_a_measured_bound(trained):
    """Measured (seed 0): epoch 0 0.40 eV/A, best of 60 epochs 0.047 eV/A; bound 0.10."""
    summary, run = trained
    maes = _val_forces_mae(run / "log.csv")
    assert len(maes) == 60
    assert summary["val"]["forces_mae"] < 0.10
    assert summary["val"]["forces_mae"] < 0.5 * maes[0]


def test_a_checkpoint_round_trip_reproduces_predictions_exactly(trained, tmp_path):
    _, run = trained
    model, ckpt = load_checkpoint(run / "model.pt")
    assert ckpt["format_version"] == 2 and ckpt["backend"] == "painn" and ckpt["elements"] == [1, 7]
    assert ckpt["training"]["config"]["seed"] == 0
    torch.load(run / "model.pt", weights_only=True)  # never needs to run code
    save_checkpoint(tmp_path / "copy.pt", model, calibration=ckpt["calibration"], training=ckpt["training"])
    again, _ = load_checkpoint(tmp_path / "copy.pt")
    atoms = read(EXAMPLE / "ood.extxyz", 0)
    for m in (model, again):
        g = m.build_graph(atoms)
        m._out = m(g, coefficients=m.coefficients(g), noise=NoiseSource.from_seeds([3, 4, 5]))
    for key in ("energy", "forces"):
        assert torch.equal(model._out[key], again._out[key])


def test_training_is_reproducible_with_a_seed(tiny_config, tmp_path):
    cfg = load_config(tiny_config, epochs=3)
    a = train(cfg, EXAMPLE / "train.extxyz", EXAMPLE / "val.extxyz", tmp_path / "a")
    b = train(cfg, EXAMPLE / "train.extxyz", EXAMPLE / "val.extxyz", tmp_path / "b")
    assert a["val"] == b["val"]
    c = train(load_config(tiny_config, epochs=3, seed=1), EXAMPLE / "train.extxyz", EXAMPLE / "val.extxyz", tmp_path / "c")
    assert c["val"] != a["val"]


def test_blip_train_command_writes_the_checkpoint_and_honours_deterministic(tiny_config, tmp_path):
    out = tmp_path / "det"
    args = [str(tiny_config), "--train", str(EXAMPLE / "train.extxyz"), "--val", str(EXAMPLE / "val.extxyz")]
    assert blip(["train", *args, "--out", str(out), "--epochs", "2", "--seed", "3", "--deterministic"]) == 0
    model, ckpt = load_checkpoint(out / "model.pt")
    assert not model.is_bayesian and ckpt["config"]["bayes"] is None
    assert ckpt["training"]["config"]["seed"] == 3 and ckpt["training"]["config"]["epochs"] == 2
    # an existing checkpoint is never overwritten silently
    assert blip(["train", *args, "--out", str(out), "--epochs", "1"]) == 2
    assert load_checkpoint(out / "model.pt")[1]["training"] == ckpt["training"]


def test_an_unknown_config_key_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\noptim: {lr: 1.0e-3, learning_rate: 2}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\] in .*bad.yaml.optim"):
        load_config(path)


def _frames_without(key: str) -> list[Atoms]:
    frames = read(EXAMPLE / "val.extxyz", ":3")
    for a in frames:
        results = {k: v for k, v in a.calc.results.items() if k != key}
        a.calc = SinglePointCalculator(a, **results)
        a.info.pop(key, None)
    return frames


@pytest.mark.parametrize("missing", ["energy", "forces"])
def test_training_data_without_labels_is_rejected_naming_the_frame(tiny_config, tmp_path, missing):
    write(tmp_path / "bad.extxyz", _frames_without(missing))
    with pytest.raises(ValueError, match=rf"bad.extxyz: frame 0 has no {missing} label"):
        train(load_config(tiny_config, epochs=1), tmp_path / "bad.extxyz", EXAMPLE / "val.extxyz", tmp_path / "o")


def test_validation_data_with_an_element_the_model_does_not_know_is_rejected(tiny_config, tmp_path):
    frames = read(EXAMPLE / "val.extxyz", ":2")
    frames[1].numbers[0] = 6  # a carbon in an H/N model
    write(tmp_path / "val_c.extxyz", frames)
    with pytest.raises(ValueError, match=r"val_c.extxyz: frame 1: unknown element\(s\) \['C'\].*knows only \['H', 'N'\]"):
        train(load_config(tiny_config, epochs=1), EXAMPLE / "train.extxyz", tmp_path / "val_c.extxyz", tmp_path / "o")


def test_nan_positions_in_the_data_are_rejected(tiny_config, tmp_path):
    frames = read(EXAMPLE / "train.extxyz", ":2")
    frames[0].positions[2, 1] = np.nan
    write(tmp_path / "nan.extxyz", frames)
    with pytest.raises(ValueError, match=r"frame 0: positions contain NaN or infinite values \(atoms \[2\]\)"):
        train(load_config(tiny_config, epochs=1), tmp_path / "nan.extxyz", EXAMPLE / "val.extxyz", tmp_path / "o")


def test_extxyz_ase_db_and_hdf5_give_the_same_frames(tmp_path):
    from ase.db import connect

    frames = read(EXAMPLE / "val.extxyz", ":")
    write_hdf5(tmp_path / "val.h5", frames)
    with connect(tmp_path / "val.db") as db:
        for a in frames:
            db.write(a)
    for path in (tmp_path / "val.h5", tmp_path / "val.db"):
        other = read_frames(path)
        assert len(other) == len(frames)
        for a, b in zip(frames, other):
            np.testing.assert_allclose(a.positions, b.positions)
            np.testing.assert_allclose(a.get_forces(), b.get_forces())
            assert a.get_potential_energy() == pytest.approx(b.get_potential_energy())


def test_an_unknown_data_format_is_named(tmp_path):
    (tmp_path / "data.csv").write_text("x,y\n")
    with pytest.raises(ValueError, match=r"data.csv: unknown data format '.csv'"):
        read_frames(tmp_path / "data.csv")


def test_a_checkpoint_of_an_unknown_format_version_is_refused(trained, tmp_path):
    _, run = trained
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["format_version"] = 99
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"format version 99; this blip-ase reads version 2"):
        load_checkpoint(tmp_path / "future.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a blip-ase checkpoint: not a readable torch.save file"):
        load_checkpoint(tmp_path / "junk.pt")


def test_the_shipped_ammonia_model_loads_and_predicts_near_equilibrium_forces():
    """The committed checkpoint is the one README's main job runs."""
    path = ammonia_model()
    model, ckpt = load_checkpoint(path)
    assert model.is_bayesian and ckpt["elements"] == [1, 7]
    frames = read(EXAMPLE / "val.extxyz", ":")
    errors = [np.abs(model(model.build_graph(a))["forces"][0].detach().numpy() - a.get_forces()).mean() for a in frames]
    assert float(np.mean(errors)) < 0.08  # measured 0.059 eV/A (best epoch, MAP)


def test_a_config_value_outside_its_choices_is_rejected_with_the_choices(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("backend: schnet\n")
    with pytest.raises(ValueError, match=r"bad.yaml.backend must be one of \['painn', 'orb'\], got 'schnet'"):
        load_config(path)


# --------------------------------------------------------------- entry point, ensembles, init_checkpoint

TINY_FAST = (
    "painn: {n_features: 8, n_interactions: 1, n_rbf: 6, cutoff: 4.0}\nepochs: 1\nbatch_size: 8\nprogress: false\n"
)


def _imports(module: str) -> set[str]:
    """Every module ``blip_ase.training.<module>`` imports, at module or function level."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[1] / "blip_ase" / "training" / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_the_training_loop_and_the_ensemble_do_not_import_each_other_in_a_cycle():
    """Before: loop.train called ensemble.train_ensemble, which called loop.train (function-level imports)."""
    import os
    import subprocess
    import sys

    loop, ensemble = _imports("loop"), _imports("ensemble")
    assert not {"blip_ase.training.ensemble", "blip_ase.training.entry"} & loop
    assert "blip_ase.training.loop" in ensemble and "blip_ase.training.entry" not in ensemble
    for module in ("loop", "ensemble", "entry"):
        code = f"import blip_ase.training.{module}"
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_train_model_refuses_an_ensemble_config(tmp_path):
    from blip_ase.training import TrainConfig
    from blip_ase.training.loop import train_model

    with pytest.raises(ValueError, match="train_model trains one model, but ensemble is 2"):
        train_model(TrainConfig(ensemble=2), EXAMPLE / "val.extxyz", EXAMPLE / "val.extxyz", tmp_path / "o")


@pytest.fixture(scope="module")
def few_frames(tmp_path_factory):
    path = tmp_path_factory.mktemp("few") / "few.extxyz"
    write(path, read(EXAMPLE / "val.extxyz", ":6"))
    return path


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0].state_dict()


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_ensemble_keeps_init_checkpoint_every_member_starts_from_its_weights(tmp_path, few_frames):
    """Before: the ensemble path dropped init_checkpoint without a word. With lr 0 a member's
    checkpoint holds exactly the weights it started from."""
    (tmp_path / "c.yaml").write_text(TINY_FAST + "seed: 11\n")
    (tmp_path / "frozen.yaml").write_text(TINY_FAST + "optim: {lr: 0.0}\n")
    train(load_config(tmp_path / "c.yaml"), few_frames, few_frames, tmp_path / "init")
    init = _state(tmp_path / "init" / "model.pt")
    summary = train(load_config(tmp_path / "frozen.yaml", ensemble=2), few_frames, few_frames, tmp_path / "ens",
                    init_checkpoint=tmp_path / "init" / "model.pt")  # fmt: skip
    assert len(summary["members"]) == 2
    for k in range(2):
        assert _same_weights(_state(tmp_path / "ens" / f"member_{k}" / "model.pt"), init)
    ckpt = load_checkpoint(tmp_path / "ens" / "model.pt")[1]
    assert ckpt["backend"] == "ensemble" and ckpt["training"]["init_checkpoint"] == str(tmp_path / "init" / "model.pt")
    # without init_checkpoint the members start from their own seeded initialisation
    train(load_config(tmp_path / "frozen.yaml", ensemble=2), few_frames, few_frames, tmp_path / "fresh")
    assert not _same_weights(_state(tmp_path / "fresh" / "member_0" / "model.pt"), init)

    # an ensemble checkpoint: member k starts from its member k; another size is refused before any training
    again = train(load_config(tmp_path / "frozen.yaml", ensemble=2), few_frames, few_frames, tmp_path / "again",
                  init_checkpoint=tmp_path / "fresh" / "model.pt")  # fmt: skip
    assert len(again["members"]) == 2
    for k in range(2):
        assert _same_weights(_state(tmp_path / "again" / f"member_{k}" / "model.pt"),
                             _state(tmp_path / "fresh" / f"member_{k}" / "model.pt"))  # fmt: skip
    for n, wanted in ((1, "a single model"), (3, "an ensemble of 3")):
        with pytest.raises(ValueError, match=rf"is an ensemble of 2 members, but the config trains {wanted}"):
            train(load_config(tmp_path / "frozen.yaml", ensemble=n), few_frames, few_frames, tmp_path / f"bad{n}",
                  init_checkpoint=tmp_path / "fresh" / "model.pt")  # fmt: skip
        assert not (tmp_path / f"bad{n}").exists()


def _spread_samples(mean: torch.Tensor, half_width: torch.Tensor) -> torch.Tensor:
    """Two samples ``mean +- half_width``: per atom the unbiased variance's trace / 3 is
    ``2 |half_width|^2 / 3``."""
    return torch.stack([mean + half_width, mean - half_width])


def test_variance_nll_equals_its_closed_form_and_is_blind_to_the_variances_scale():
    gen = torch.Generator().manual_seed(0)
    target, mean, width = (torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    term, nll = variance_nll(_spread_samples(mean, width), target)
    v = 2 * (width**2).sum(-1).numpy() / 3
    e = ((mean - target) ** 2).sum(-1).numpy() / 3
    s = np.mean(e / v)
    assert nll == pytest.approx(0.5 * (np.log(2 * np.pi * s) + np.mean(np.log(v)) + 1), rel=1e-12)
    assert float(term) == pytest.approx(0.5 * (np.mean(np.log(v)) + 1), rel=1e-12)  # the scale is fitted
    _, scaled = variance_nll(_spread_samples(mean, 7.0 * width), target)
    assert scaled == pytest.approx(nll, rel=1e-12)


def test_variance_nll_has_no_gradient_when_the_variances_follow_the_errors_and_one_when_they_do_not():
    gen = torch.Generator().manual_seed(1)
    target, mean, direction = (torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    error = ((mean - target) ** 2).sum(-1, keepdim=True) / 3
    for width, flat in ((direction / direction.norm(dim=-1, keepdim=True) * error.sqrt() * 0.3, True),
                        (direction, False)):  # fmt: skip
        width = width.clone().requires_grad_(True)
        term, _ = variance_nll(_spread_samples(mean, width), target)
        (grad,) = torch.autograd.grad(term, width)
        assert (float(grad.abs().max()) < 1e-12) == flat


def test_variance_nll_refuses_one_sample_and_non_finite_forces():
    forces = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=">= 2 Monte Carlo samples"):
        variance_nll(forces[:1], forces[0])
    forces[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        variance_nll(forces, torch.zeros(4, 3))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"loss": {"nll_weight": -0.1}}, "loss.nll_weight must be a finite number >= 0"),
    ({"loss": {"nll_weight": float("nan")}}, "loss.nll_weight must be a finite number"),
    ({"loss": {"nll_samples": 1}}, "loss.nll_samples must be an integer >= 2"),
    ({"loss": {"nll_weight": 1.0}, "deterministic": True}, "set it to 0 for a deterministic model"),
    ({"loss": {"nll_weight": 1.0}, "bayes": {"method": "mc_dropout"}}, "set it to 0 for bayes.method 'mc_dropout'"),
])  # fmt: skip
def test_bad_scoring_rule_settings_are_refused_by_name(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        with_overrides(load_config(tiny_config), overrides)


def test_the_variance_scoring_rule_trains_the_inference_network_and_leaves_the_potential_alone(tiny_config):
    """With every other term off, one step with ``loss.nll_weight`` moves only the inference
    network's parameters (the potential learns from the ELBO alone)."""
    cfg = with_overrides(load_config(tiny_config), {
        "loss": {"energy_weight": 0.0, "forces_weight": 0.0, "nll_weight": 1.0}, "bayes": {"kl_weight": 0.0},
    })  # fmt: skip
    torch.manual_seed(0)
    frames = read_frames(EXAMPLE / "train.extxyz")[:8]
    model = build_model(cfg, [1, 7])
    batch = model.make_dataset(frames).batch(list(range(8))).to("cpu", torch.float32)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    parts = train_step(model, batch, cfg, torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator().manual_seed(0),
                       False)  # fmt: skip
    assert np.isfinite(parts["nll"])
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert moved and all(name.startswith("posterior.") for name in moved)


def test_training_with_the_scoring_rule_is_reproducible_and_logs_it(tiny_config, tmp_path):
    cfg = with_overrides(load_config(tiny_config, epochs=2), {"loss": {"nll_weight": 0.1}})
    a = train(cfg, EXAMPLE / "train.extxyz", EXAMPLE / "val.extxyz", tmp_path / "a")
    b = train(cfg, EXAMPLE / "train.extxyz", EXAMPLE / "val.extxyz", tmp_path / "b")
    assert a["val"] == b["val"]
    with open(tmp_path / "a" / "log.csv") as fh:
        assert all(np.isfinite(float(row["train_nll"])) and float(row["train_nll"]) != 0 for row in csv.DictReader(fh))
