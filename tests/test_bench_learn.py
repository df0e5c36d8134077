"""The learning-curve benchmark's pieces (``md_scripts/bench_learn.py``): the GFN2-xTB oracle
through ``blip learn``'s ``ase`` oracle, the per-strategy configs, and the curve bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule
from conftest import load_script

from blip_ase.active.config import OracleConfig
from blip_ase.active.oracle import check_oracle, label_one


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_learn")


def test_the_xtb_oracle_labels_ethanol_like_tblite_itself(bench):
    tblite = pytest.importorskip("tblite.ase", reason='GFN2-xTB is the [xtb] extra: pip install -e ".[xtb]"')
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    oracle = OracleConfig(**bench.XTB, workers=1)
    check_oracle(oracle, [atoms])
    label = label_one(atoms, oracle)
    assert label.error is None and label.forces.shape == (9, 3)
    direct = atoms.copy()
    direct.calc = tblite.TBLite(method="GFN2-xTB", verbosity=0)
    assert label.energy == pytest.approx(direct.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(label.forces, direct.get_forces(), atol=1e-6)
    assert oracle.name == "ase:tblite.ase:TBLite"


def test_every_strategy_gets_the_same_exploration_and_budget(bench, tmp_path):
    import argparse

    args = argparse.Namespace(explore_K=[600.0, 1200.0], steps=50, uq_interval=10, n_samples=8, members=3,
                              halt=None, budget=4, epochs=2, rounds=1)  # fmt: skip
    case = {"structure": tmp_path / "ethanol.xyz", "train": tmp_path / "train.extxyz", "val": tmp_path / "val.extxyz",
            "test": tmp_path / "test.extxyz", "blip": tmp_path / "blip.pt", "ensemble": tmp_path / "ensemble.pt",
            "oracle": {**bench.XTB, "workers": 1}}  # fmt: skip
    configs = {s: bench.learn_config(case, s, 1, args) for s in bench.STRATEGIES}
    fps = configs["fps"]
    for config in configs.values():
        explore = config.explore
        assert (explore.structures, explore.temperatures_K, explore.steps) == (
            fps.explore.structures,
            fps.explore.temperatures_K,
            50,
        )
        assert {k: v for k, v in explore.md.items() if k != "n_samples"} == {
            k: v for k, v in fps.explore.md.items() if k != "n_samples"
        }
        assert config.select.budget == 4 and config.stop.max_rounds == 1 and config.seed == 1
        assert explore.thresholds().force_std_flag == 0.0  # the pool: every check
    assert configs["random"].select.strategy == "random" and configs["max_variance"].select.strategy == "max_variance"
    ensemble = configs["ensemble"]
    assert ensemble.model.endswith("ensemble.pt") and ensemble.select.strategy == "fps"
    assert ensemble.train.config["ensemble"] == 3 and ensemble.explore.md["n_samples"] == 3


def test_the_curve_pairs_each_model_with_the_labels_it_was_trained_on(bench):
    run = {"n_start": 50, "rows": [
        {"round": 1, "test_forces_mae": 0.30, "labels_total": 66, "seconds_md": 1.0, "seconds_label": 1.0,
         "seconds_train": 2.0, "md_steps_completed": 100, "halted": 0},
        {"round": 2, "test_forces_mae": 0.20, "labels_total": 82, "seconds_md": 1.0, "seconds_label": 1.0,
         "seconds_train": 4.0, "md_steps_completed": 50, "halted": 1},
        {"round": 3, "test_forces_mae": 0.10},
    ]}  # fmt: skip
    points = bench.curve(run)
    assert points == [(50, 0.30), (66, 0.20), (82, 0.10)]
    assert bench.labels_to_target(points, 0.2) == 66 and bench.labels_to_target(points, 0.05) is None
    assert bench.round_seconds(run) == [4.0, 6.0]
    text = bench.table({"fps_s0": run, "fps_s1": run}, ["fps", "random"], 0.2)
    assert "| fps | 0.300 ± 0.000 (50 ± 0) |" in text and "| 66, 66 |" in text and "random" not in text
    assert text.rstrip().endswith("| 5 ± 1 | 75 | 0.50 |")
    assert "| >82, >82 |" in bench.table({"fps_s0": run, "fps_s1": run}, ["fps"], 0.05)


def test_an_ensemble_only_run_without_a_target_is_refused_before_any_work(bench, tmp_path, capsys):
    """Its default target is 0.7 x the BLIP start model's MAE, which only a BLIP strategy measures."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--case", "nh3", "--out", str(tmp_path / "out"), "--strategies", "ensemble"])
    assert exit_info.value.code == 2 and "--target is needed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
