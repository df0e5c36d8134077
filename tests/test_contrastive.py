"""The adaptive-noise options: noise-contrastive prior, neighbourhood-aware beta, KL warm-up,
model selection by the Monte Carlo validation NLL, and nested config overrides."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read

from blip_ase.bayes.kl import kl_per_coefficient
from blip_ase.training import load_config, train, with_overrides
from blip_ase.training.contrastive import ContrastiveConfig, contrastive_kl, perturb_edge_vectors
from blip_ase.training.loop import build_model, kl_factor
from conftest import TINY_BAYES, build_potential, load_script

ROOT = Path(__file__).resolve().parents[1]
AMMONIA = ROOT / "examples" / "ammonia"
NEIGHBOURHOOD = replace(TINY_BAYES, neighbourhood=True)


def test_neighbourhood_beta_depends_on_the_geometry_and_is_rotation_invariant(ammonia, rotation):
    model = build_potential(NEIGHBOURHOOD)
    moved = ammonia.copy()
    moved.positions = ammonia.positions @ rotation.T + 1.0
    stretched = ammonia.copy()
    stretched.positions *= 1.2
    c0, c1, c2 = (model.coefficients(model.build_graph(a)) for a in (ammonia, moved, stretched))
    torch.testing.assert_close(c1.node, c0.node, rtol=1e-10, atol=1e-12)
    assert (c2.node - c0.node).abs().max() > 1e-3
    assert c0.node_jacobian is not None and c0.node_jacobian.abs().max() > 1e-4


def test_environment_alpha_sees_other_atoms_and_is_rotation_invariant(ammonia, rotation):
    """With environment features, alpha of the N-H1 bond changes when H2 moves while N-H1 keeps its
    length; without them it cannot. Both are invariant under rotation and translation."""
    for environment, should_change in ((4, True), (0, False)):
        model = build_potential(replace(TINY_BAYES, environment=environment), spread=True)
        moved = ammonia.copy()
        moved.positions = ammonia.positions @ rotation.T + 1.0
        bent = ammonia.copy()
        bent.positions[2] += 0.3 * np.cross(ammonia.positions[2] - ammonia.positions[0], [0.0, 0.0, 1.0])
        c0, c1, c2 = (model.coefficients(model.build_graph(a)) for a in (ammonia, moved, bent))
        torch.testing.assert_close(c1.edge, c0.edge, rtol=1e-10, atol=1e-12)
        i, j = model.build_graph(ammonia).edge_index
        bond = int(torch.nonzero((i == 0) & (j == 1))[0])
        change = float((c2.edge[bond] - c0.edge[bond]).abs().max())
        assert (change > 1e-4) == should_change, (environment, change)


def test_perturbed_edge_vectors_are_those_of_a_rattled_and_stretched_geometry(bayesian_potential, mo_cell):
    """The perturbation acts on edge vectors, but they must belong to one real geometry:
    positions ``s (r + sigma z)`` in the cell ``s * cell``."""
    model = bayesian_potential
    graph = model.build_graph(mo_cell)
    x = model.posterior_inputs(graph)
    cfg = ContrastiveConfig(weight=1.0, rattle_A=0.25, rattle_min_A=0.05, stretch=0.1)
    g = torch.Generator().manual_seed(5)
    perturbed = perturb_edge_vectors(x, cfg, g)
    g = torch.Generator().manual_seed(5)
    u = torch.rand(2, 1, generator=g, dtype=torch.float64)
    z = torch.randn(len(mo_cell), 3, generator=g, dtype=torch.float64) * (0.05 + 0.2 * u[0])
    scale = 1.0 + 0.1 * (2.0 * u[1] - 1.0)
    expected = model.edge_vectors(graph, scale * (graph.positions + z), scale * graph.cell)
    torch.testing.assert_close(perturbed, expected, rtol=1e-12, atol=1e-12)
    assert (perturbed - x.edge_vector).abs().max() > 1e-2


def test_perturbations_are_seeded_and_never_change_the_labelled_batch(bayesian_potential, ammonia, mo_cell):
    model = bayesian_potential
    from blip_ase.data.graph import batch_graphs

    graph = batch_graphs([model.build_graph(ammonia), model.build_graph(mo_cell)])
    before = graph.positions.clone(), graph.cell.clone()
    cfg = ContrastiveConfig(weight=1.0, copies=2)
    kls = [contrastive_kl(model, graph, cfg, torch.Generator().manual_seed(s), 0.5) for s in (1, 1, 2)]
    assert float(kls[0]) == float(kls[1]) and float(kls[0]) != float(kls[2])
    assert torch.equal(graph.positions, before[0]) and torch.equal(graph.cell, before[1])


@pytest.mark.parametrize(
    "bad", [{"weight": -1.0}, {"stretch": 1.0}, {"copies": 0}, {"rattle_A": -0.1}, {"rattle_min_A": 0.5}]
)
def test_a_bad_contrastive_setting_is_rejected(bad):
    with pytest.raises(ValueError, match="contrastive needs"):
        ContrastiveConfig(**bad)


@pytest.mark.parametrize(
    "bad, match", [({"select_samples": 1}, "select_samples"), ({"kl_warmup_epochs": -1}, "kl_warmup_epochs")]
)
def test_a_bad_selection_or_warm_up_setting_is_rejected(tmp_path, bad, match):
    """One sample has no variance: the MC NLL would be NaN and no epoch would ever be kept."""
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=match):
        load_config(path)


def test_kl_warm_up_rises_linearly_to_one():
    assert [kl_factor(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_factor(0, 0) == 1.0


def test_nested_overrides_replace_one_field_and_reject_unknown_keys():
    cfg = load_config(AMMONIA / "config.yaml")
    new = with_overrides(cfg, {"bayes": {"kl_weight": 0.5}, "contrastive": {"weight": 2.0}})
    assert new.bayes.kl_weight == 0.5 and new.bayes.p0 == cfg.bayes.p0 and new.contrastive.weight == 2.0
    with pytest.raises(ValueError, match="kl_wieght"):
        with_overrides(cfg, {"bayes": {"kl_wieght": 0.5}})
    with pytest.raises(ValueError, match="select_by must be one of"):
        with_overrides(cfg, {"select_by": "best"})


@pytest.fixture(scope="module")
def ammonia_split(tmp_path_factory) -> dict[str, Path]:
    from ase.io import write

    out = tmp_path_factory.mktemp("split")
    frames = read(AMMONIA / "train.extxyz", ":40")
    write(out / "train.extxyz", frames[:32])
    write(out / "val.extxyz", frames[32:])
    return {"train": out / "train.extxyz", "val": out / "val.extxyz"}


def _tiny_config(**overrides):
    cfg = load_config(AMMONIA / "config.yaml", progress=False, epochs=40, batch_size=16)
    small = {"painn": {"n_features": 16, "n_interactions": 2}, "bayes": {"hidden": 16}}
    return with_overrides(with_overrides(cfg, small), overrides)


def _mean_alpha(model, frames) -> float:
    from blip_ase.uq.coefficients import collect_coefficients

    return float(collect_coefficients(model, frames)["edge"].mean())


def test_the_contrastive_prior_makes_alpha_larger_away_from_the_training_geometries(ammonia_split, tmp_path):
    """The point of the option: trained with a weak KL on the data and the prior's KL on
    perturbed copies, the network predicts more noise on perturbed than on training geometries;
    without it, alpha is (nearly) the same everywhere."""
    from blip_ase.models.checkpoint import load_checkpoint

    frames = read(ammonia_split["train"], ":")
    rattled = [a.copy() for a in frames]
    for k, a in enumerate(rattled):
        a.rattle(stdev=0.25, seed=k)
    ratios = {}
    for name, weight in (("with", 0.01), ("without", 0.0)):
        cfg = _tiny_config(bayes={"kl_weight": 0.001}, contrastive={"weight": weight}, optim={"posterior_lr": 1e-2},
                           epochs=60)
        train(cfg, ammonia_split["train"], ammonia_split["val"], tmp_path / name)
        model, _ = load_checkpoint(tmp_path / name / "model.pt")
        ratios[name] = _mean_alpha(model, rattled) / _mean_alpha(model, frames)
    assert ratios["with"] > 1.5, ratios
    assert ratios["with"] > ratios["without"] + 0.3, ratios


def test_selection_by_mc_nll_keeps_the_epoch_with_the_lowest_logged_nll(ammonia_split, tmp_path):
    cfg = _tiny_config(epochs=6, select_by="mc_nll", select_samples=4)
    summary = train(cfg, ammonia_split["train"], ammonia_split["val"], tmp_path)
    with open(tmp_path / "log.csv") as fh:
        nll = [float(row["val_mc_nll"]) for row in csv.DictReader(fh)]
    assert len(nll) == 6 and np.all(np.isfinite(nll))
    assert summary["best_epoch"] == int(np.argmin(nll))


# --- kind: modes ------------------------------------------------------------------------------


def _planted_frames(ammonia, n: int = 30, seed: int = 0):
    """Copies of ``ammonia`` displaced along one fixed internal mode (a random displacement with
    translations and infinitesimal rotations projected out; amplitude N(0, 0.05^2)), then rotated
    and translated at random: the one mode the fit must find. Returns ``(frames, amplitudes)``."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    centred = ammonia.positions - ammonia.positions.mean(axis=0)
    rigid = [np.tile(np.eye(3)[k], (len(ammonia), 1)) for k in range(3)]
    rigid += [np.cross(np.eye(3)[k], centred) for k in range(3)]
    basis = np.linalg.qr(np.stack([r.ravel() for r in rigid], axis=1))[0]
    mode = rng.normal(size=3 * len(ammonia))
    mode -= basis @ (basis.T @ mode)
    mode = (mode / np.linalg.norm(mode)).reshape(-1, 3)
    amplitudes = rng.normal(0.0, 0.05, n)
    frames = []
    for k in range(n):
        a = ammonia.copy()
        a.positions = (ammonia.positions + amplitudes[k] * mode) @ Rotation.random(random_state=k).as_matrix().T
        a.positions += rng.normal(size=3)
        frames.append(a)
    return frames, amplitudes


def test_displacement_modes_find_the_planted_mode_of_rotated_and_translated_copies(ammonia):
    from blip_ase.training.contrastive import displacement_modes

    frames, amplitudes = _planted_frames(ammonia)
    modes = displacement_modes(frames, [1, 7])
    ((key, (mean, factor)),) = modes.groups.items()
    assert key == tuple(0 if z == 1 else 1 for z in ammonia.numbers)
    assert mean.shape == (len(ammonia), 3)
    lam = np.sort((factor**2).sum(dim=0).numpy())
    assert lam[-1] == pytest.approx(np.var(amplitudes, ddof=1), rel=0.02)  # rigid motions aligned away
    assert lam.size == 1 or lam[-2] < 1e-3 * lam[-1]
    periodic = [a.copy() for a in frames]
    for a in periodic:
        a.pbc, a.cell = True, [10.0, 10.0, 10.0]
    assert displacement_modes(periodic + frames[:1], [1, 7]).groups == {}  # periodic, or one structure only


def test_mode_copies_are_real_geometries_and_other_structures_keep_their_rattled_copies(
    bayesian_potential, ammonia, mo_cell
):
    """Molecules with modes get ``s (mean + f factor w)``; a structure without (bcc Mo) gets
    exactly the rattled copy of ``kind: rattle``, drawn first from the same generator."""
    from blip_ase.data.graph import batch_graphs
    from blip_ase.training.contrastive import displacement_modes

    model = bayesian_potential
    modes = displacement_modes(_planted_frames(ammonia)[0], model.elements)
    graph = batch_graphs([model.build_graph(mo_cell), model.build_graph(ammonia)])
    x = model.posterior_inputs(graph)
    cfg = ContrastiveConfig(weight=1.0, kind="modes", mode_scale_min=2.0, mode_scale=3.0, stretch=0.1)
    perturbed = perturb_edge_vectors(x, cfg, torch.Generator().manual_seed(3), modes)
    rattled = perturb_edge_vectors(x, replace(cfg, kind="rattle"), torch.Generator().manual_seed(3), modes)
    mo = x.atom_graph[x.edge_index[0]] == 0
    torch.testing.assert_close(perturbed[mo], rattled[mo], rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    u = torch.rand(2, 2, generator=g, dtype=torch.float64)
    torch.randn(len(mo_cell) + len(ammonia), 3, generator=g, dtype=torch.float64)
    ((mean, factor),) = modes.groups.values()
    f = 2.0 + float(torch.rand(1, generator=g, dtype=torch.float64))
    w = torch.randn(factor.shape[1], generator=g, dtype=torch.float64)
    positions = (1.0 + 0.1 * (2.0 * u[1, 1] - 1.0)) * (mean + f * (factor @ w).reshape(-1, 3))
    i, j = x.edge_index[:, ~mo] - len(mo_cell)
    torch.testing.assert_close(perturbed[~mo], positions[j] - positions[i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "bad", [{"kind": "shake"}, {"mode_scale_min": 0.0}, {"mode_scale_min": 5.0, "mode_scale": 4.0}]
)
def test_a_bad_mode_setting_is_rejected(bad):
    with pytest.raises(ValueError, match="contrastive"):
        ContrastiveConfig(**bad)


def test_mode_copies_make_alpha_larger_on_hotter_geometries_than_on_the_training_ones(ammonia_split, tmp_path):
    """``kind: modes``: trained with the prior's KL on the data's own modes amplified 1.5-4x,
    the network predicts more noise on structures 3x hotter along those modes (drawn here
    independently of training) than on the training structures."""
    from blip_ase.models.checkpoint import load_checkpoint
    from blip_ase.training.contrastive import displacement_modes

    frames = read(ammonia_split["train"], ":")
    cfg = _tiny_config(
        bayes={"kl_weight": 0.001},
        optim={"posterior_lr": 1e-2},
        epochs=60,
        contrastive={"weight": 0.01, "kind": "modes", "stretch": 0.0},
    )
    train(cfg, ammonia_split["train"], ammonia_split["val"], tmp_path)
    model, _ = load_checkpoint(tmp_path / "model.pt")
    ((mean, factor),) = displacement_modes(frames, model.elements).groups.values()
    rng = np.random.default_rng(0)
    hot = []
    for _ in range(20):
        a = frames[0].copy()
        w = torch.from_numpy(rng.normal(size=factor.shape[1]))
        a.positions = (mean + 3.0 * (factor @ w).reshape(-1, 3)).numpy()
        hot.append(a)
    ratio = _mean_alpha(model, hot) / _mean_alpha(model, frames)
    assert ratio > 1.5, ratio


def test_alpha_by_distortion_places_rattled_copies_above_the_data_for_the_shipped_model(capsys, tmp_path):
    """``md_scripts/alpha_by_distortion.py`` on the shipped model: alpha of 0.3 A rattles of its
    validation frames exceeds alpha on the frames themselves, in the table's every column; a model
    without an inference network is refused by name."""
    from blip_ase.assets import ammonia_model
    from blip_ase.models import PaiNNConfig, PaiNNPotential, save_checkpoint

    script = load_script("alpha_by_distortion")
    val = Path(__file__).resolve().parents[1] / "examples" / "ammonia" / "val.extxyz"
    assert script.main([str(ammonia_model()), "--data", str(val), "--frames", "5", "--rattle", "0.3"]) == 0
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"data", "rattle 0.3 A"} and len(rows["data"]) >= 2
    assert all(r > d for r, d in zip(rows["rattle 0.3 A"], rows["data"]))
    save_checkpoint(tmp_path / "det.pt", PaiNNPotential([1, 7], PaiNNConfig(n_features=8, n_interactions=1, n_rbf=6)))
    with pytest.raises(SystemExit, match="has no inference network"):
        script.main([str(tmp_path / "det.pt"), "--data", str(val), "--frames", "2", "--rattle", "0.1"])


def test_max_edge_a_keeps_the_contrastive_kl_of_short_edges_only_at_their_full_weight():
    """With ``max_edge_A`` the long edges' KL is dropped and each short edge's counts as before:
    the cut KL equals the full KL with the long edges' terms zeroed (same copies, same draws)."""
    frames = read(ROOT / "examples" / "acac" / "acac_train_300K.extxyz", ":2")
    cfg = with_overrides(load_config(ROOT / "examples" / "acac" / "config.yaml"), {"contrastive": {"max_edge_A": 1.6}})
    torch.manual_seed(0)
    model = build_model(cfg, [1, 6, 8])
    graph = model.make_dataset(frames).batch([0, 1]).to("cpu", torch.float32).graph
    cut = contrastive_kl(model, graph, cfg.contrastive, torch.Generator().manual_seed(0), 0.5)
    x = model.posterior_inputs(graph)
    vectors = perturb_edge_vectors(x, cfg.contrastive, torch.Generator().manual_seed(0))
    copy = model.posterior(x.species, x.edge_index, vectors)
    short = (x.edge_vector.norm(dim=-1) <= 1.6).float()[:, None]
    assert 0 < short.mean() < 0.5  # bonds only: most edges of acac within 5 A are longer
    expected = (kl_per_coefficient(copy.edge, 0.5) * short).mean(dim=0).sum()
    torch.testing.assert_close(cut, expected)
    every = replace(cfg.contrastive, max_edge_A=None)
    full = contrastive_kl(model, graph, every, torch.Generator().manual_seed(0), 0.5)
    assert float(full) > 2 * float(cut)
    with pytest.raises(ValueError, match="contrastive.max_edge_A must be a positive length"):
        replace(cfg.contrastive, max_edge_A=0.0)


def test_alpha_by_distortion_splits_alpha_by_edge_length(capsys):
    """``--lengths``: one column per length bin, each with the edges per structure; NH3 within
    the shipped model's 5 A cutoff has 3 N-H pairs each way (6 edges below 1.2 A) and 6 H-H
    edges (1.5-1.7 A), so every edge lands in a bin and the counts add up to 12."""
    from blip_ase.assets import ammonia_model

    script = load_script("alpha_by_distortion")
    val = Path(__file__).resolve().parents[1] / "examples" / "ammonia" / "val.extxyz"
    args = [str(ammonia_model()), "--data", str(val), "--frames", "3", "--rattle", "--lengths", "1.2", "2.0"]
    assert script.main(args) == 0
    split = capsys.readouterr().out.split("\n\n")[1].splitlines()
    assert split[0] == "| set | 0-1.2 A | 1.2-2 A | > 2 A |" and split[2].startswith("| data |")
    cells = [c.strip() for c in split[2].split("|")[2:-1]]
    assert [int(c.split("(")[1].rstrip(")")) for c in cells[:2]] == [6, 6] and cells[2] == "–"
    with pytest.raises(SystemExit):
        script.main([*args[:-2], "2.0", "1.2"])


def test_variance_by_edge_length_drops_the_variance_as_alpha_is_switched_off(capsys, tmp_path):
    """``md_scripts/variance_by_edge_length.py`` on the shipped model: the variance falls
    monotonically as alpha is zeroed on ever shorter edges (beta's noise stays), and a model
    without an inference network is refused."""
    from blip_ase.assets import ammonia_model
    from blip_ase.models import PaiNNConfig, PaiNNPotential, save_checkpoint

    script = load_script("variance_by_edge_length")
    ood = Path(__file__).resolve().parents[1] / "examples" / "ammonia" / "ood.extxyz"
    assert script.main([str(ammonia_model()), "--data", str(ood), "--frames", "4", "--cuts", "1.3", "0.5",
                        "--n-samples", "4"]) == 0  # fmt: skip
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["(no cut)", "1.3 A", "0.5 A"]
    fractions = [float(r[2]) for r in rows]
    assert fractions[0] == 1.0 and fractions[0] > fractions[1] > fractions[2] >= 0
    save_checkpoint(tmp_path / "det.pt", PaiNNPotential([1, 7], PaiNNConfig(n_features=8, n_interactions=1, n_rbf=6)))
    with pytest.raises(SystemExit, match="has no inference network"):
        script.main([str(tmp_path / "det.pt"), "--data", str(ood), "--frames", "3"])
    with pytest.raises(SystemExit, match="--data: .*does not exist"):
        script.main([str(ammonia_model()), "--data", str(tmp_path / "missing.extxyz")])
    with pytest.raises(SystemExit):  # 2 frames: no rank correlation
        script.main([str(ammonia_model()), "--data", str(ood), "--frames", "2"])
    assert "--frames >= 3" in capsys.readouterr().err
