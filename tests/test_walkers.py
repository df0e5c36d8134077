"""Batched many-walker monitored MD on torch-sim (``blip_ase.md.walkers``, ``blip md --walkers``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read, write

from blip_ase.calculator import BLIPCalculator
from blip_ase.cli.main import main as blip
from blip_ase.md import MDConfig, Thresholds, read_hdf5_frames, read_history
from blip_ase.md.walkers import WalkersConfig, run_walkers
from conftest import save_tiny_checkpoint

pytest.importorskip("torch_sim", reason="torch-sim-atomistic is a dependency of blip-ase")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A tiny random Bayesian PaiNN (H, N) in float64, so batched and single runs agree tightly."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny64.pt", dtype=torch.float64)


@pytest.fixture(scope="module")
def starts(tmp_path_factory) -> Path:
    """Three NH3 start structures: equilibrium and two rattled ones."""
    frames = []
    for k in range(3):
        atoms = molecule("NH3")
        atoms.rattle(0.03 * k, seed=k)
        frames.append(atoms)
    path = tmp_path_factory.mktemp("starts") / "nh3.extxyz"
    write(path, frames)
    return path


def max_std(model: Path, atoms) -> float:
    calc = BLIPCalculator.from_checkpoint(model, n_samples=16, seed=0)
    return float(np.sqrt(calc.monte_carlo(atoms)["forces_variance"].max()))


def config(model: Path, out: Path, **md) -> MDConfig:
    settings = dict(model=str(model), out=str(out), steps=30, uq_interval=5, traj_interval=5, n_samples=4, plot=False)
    return MDConfig(**{**settings, **md})


def trajectory(out: Path, k: int) -> np.ndarray:
    return np.array([a.positions for a in read(out / f"walker_{k}.traj", ":")])


def history(out: Path, k: int) -> list[dict]:
    return [r for r in read_history(out / "uncertainty.csv") if r["walker"] == k]


def test_a_batch_of_walkers_equals_separate_single_walker_runs(model_path, starts, tmp_path):
    """NVE: trajectories and Monte Carlo uncertainties of each walker are those of its own run."""
    temperatures = (300.0, 800.0, 1500.0)
    thresholds = Thresholds(force_std_flag=0.0, force_std_halt=None)  # every check is flagged and exported
    # the tiny random model's 1500 K NVE flies apart; this test is about batching, not physics
    md = config(model_path, tmp_path / "batch", ensemble="nve", thresholds=thresholds, physical=None)
    summary = run_walkers(WalkersConfig(md, n_walkers=3, temperatures_K=temperatures, structures=(str(starts),)))
    assert summary["status"] == "completed" and [w["status"] for w in summary["walkers"]] == ["completed"] * 3
    flagged = read(tmp_path / "batch" / "flagged.extxyz", ":")
    for k in range(3):
        alone = config(model_path, tmp_path / f"alone{k}", ensemble="nve", seed=k, thresholds=thresholds, physical=None)
        run_walkers(WalkersConfig(alone, temperatures_K=(temperatures[k],), structures=(f"{starts}@{k}",)))
        batch_traj, alone_traj = trajectory(tmp_path / "batch", k), trajectory(tmp_path / f"alone{k}", 0)
        assert batch_traj.shape == (7, 4, 3) and np.ptp(batch_traj[:, :, 0], axis=0).max() > 1e-3  # the atoms moved
        np.testing.assert_allclose(batch_traj, alone_traj, rtol=0, atol=1e-9)
        ours, theirs = history(tmp_path / "batch", k), history(tmp_path / f"alone{k}", 0)
        assert [r["step"] for r in ours] == [0, 5, 10, 15, 20, 25, 30]
        for key in ("max_force_std", "energy_std", "temperature_K"):
            np.testing.assert_allclose([r[key] for r in ours], [r[key] for r in theirs], rtol=1e-8, atol=1e-12)
        # the exported frames carry the walker id and the walker's own uncertainty
        mine = [f for f in flagged if f.info["walker"] == k]
        assert [f.info["step"] for f in mine] == [r["step"] for r in ours]
        np.testing.assert_allclose([np.sqrt(f.arrays["blip_forces_variance"].max()) for f in mine],
                                   [r["max_force_std"] for r in ours], rtol=1e-6)  # fmt: skip
    assert {f.info["walker"] for f in read_hdf5_frames(tmp_path / "batch" / "flagged.h5")} == {0, 1, 2}


def test_walkers_of_different_molecules_export_their_flagged_frames_to_one_file(model_path, tmp_path):
    """NH3 and N2H4 in one batch, every check flagged: both exports hold both sizes."""
    starts = tmp_path / "mixed.extxyz"
    write(starts, [molecule("NH3"), molecule("N2H4")])
    md = config(model_path, tmp_path / "mixed", steps=10, ensemble="nve", physical=None,
                thresholds=Thresholds(force_std_flag=0.0, force_std_halt=None))  # fmt: skip
    summary = run_walkers(WalkersConfig(md, n_walkers=2, temperatures_K=(300.0, 300.0), structures=(str(starts),)))
    assert summary["status"] == "completed"
    out = tmp_path / "mixed"
    for frames in (read(out / "flagged.extxyz", ":"), read_hdf5_frames(out / "flagged.h5")):
        assert sorted({(f.info["walker"], len(f)) for f in frames}) == [(0, 4), (1, 6)]
        assert len(frames) == 2 * 3  # steps 0, 5, 10 of both walkers


def test_a_walker_above_the_halt_threshold_leaves_the_batch_and_the_others_complete(model_path, starts, tmp_path):
    candidates = []
    for factor in (0.6, 0.75, 1.5, 1.9):  # squeezed or stretched N-H bonds: the most uncertain one is used
        far = molecule("NH3")
        far.positions[1:] = far.positions[0] + factor * (far.positions[1:] - far.positions[0])
        candidates.append((max_std(model_path, far), factor, far))
    far_std, _, far = max(candidates, key=lambda c: c[0])
    near_std = max(max_std(model_path, read(starts, k)) for k in (0, 1))
    assert far_std > 1.4 * near_std, (near_std, far_std)
    halt = 0.5 * (near_std + far_std)  # the 50 K walkers stay close to their start
    path = tmp_path / "mixed.extxyz"
    write(path, [read(starts, 0), far, read(starts, 1)])
    thresholds = Thresholds(force_std_flag=halt, force_std_halt=halt)
    md = config(model_path, tmp_path / "out", thresholds=thresholds, temperature_K=50.0, n_samples=16)
    summary = run_walkers(WalkersConfig(md, n_walkers=3, structures=(str(path),)))
    statuses = {w["walker"]: w["status"] for w in summary["walkers"]}
    assert statuses == {0: "completed", 1: "halted", 2: "completed"}, summary["walkers"]
    assert summary["status"] == "completed" and summary["final_step"] == 30 and summary["n_halted"] == 1
    halted = summary["walkers"][1]
    step = halted["halt_step"]
    assert step <= 10 and "max_force_std" in halted["stop_reason"]
    assert [a.info["step"] for a in read(tmp_path / "out" / "walker_1.traj", ":")] == list(range(0, step + 1, 5))
    assert [r["step"] for r in history(tmp_path / "out", 1)] == list(range(0, step + 1, 5))
    assert len(history(tmp_path / "out", 0)) == len(history(tmp_path / "out", 2)) == 7
    frames = read(tmp_path / "out" / "flagged.extxyz", ":")
    assert [f.info["walker"] for f in frames if f.info["reason"].startswith("halt")] == [1]


def test_a_walker_with_a_non_finite_prediction_halts_alone(model_path, starts, tmp_path):
    bad = molecule("NH3")
    bad.positions[2] = bad.positions[1]  # two coincident H atoms: NaN forces
    path = tmp_path / "bad.extxyz"
    write(path, [read(starts, 0), bad])
    md = config(model_path, tmp_path / "out", thresholds=Thresholds(force_std_flag=10.0, force_std_halt=20.0))
    summary = run_walkers(WalkersConfig(md, n_walkers=4, structures=(str(path),)))
    statuses = [w["status"] for w in summary["walkers"]]
    assert statuses == ["completed", "halted", "completed", "halted"]
    for w in summary["walkers"][1::2]:
        assert w["halt_step"] == 0 and "non-finite prediction" in w["stop_reason"]
    frames = read(tmp_path / "out" / "flagged.extxyz", ":")
    assert sorted(f.info["walker"] for f in frames) == [1, 3]


def test_langevin_walkers_repeat_with_the_same_seed_and_follow_their_own_temperatures(model_path, starts, tmp_path):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        md = config(model_path, tmp_path / name, steps=200, uq_interval=10, seed=seed, friction_per_fs=0.05,
                    thresholds=Thresholds(force_std_flag=None, force_std_halt=None), physical=None)  # fmt: skip
        run_walkers(WalkersConfig(md, n_walkers=2, temperatures_K=(100.0, 2000.0), structures=(f"{starts}@0",)))
        runs.append([trajectory(tmp_path / name, k) for k in range(2)])
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert not np.allclose(runs[0][0], runs[2][0])
    cold, hot = (np.mean([r["temperature_K"] for r in history(tmp_path / "a", k)[5:]]) for k in range(2))
    assert 30 < cold < 300 and hot > 4 * cold, (cold, hot)


def test_a_halted_walker_can_be_respawned_from_its_start(model_path, starts, tmp_path):
    bad = molecule("NH3")
    bad.positions[2] = bad.positions[1]
    path = tmp_path / "bad.extxyz"
    write(path, [read(starts, 0), bad])
    md = config(model_path, tmp_path / "out", steps=10, thresholds=Thresholds(force_std_flag=10.0, force_std_halt=20.0))
    summary = run_walkers(WalkersConfig(md, n_walkers=2, structures=(str(path),), respawn=True))
    walker = summary["walkers"][1]
    assert walker["respawns"] == 1 and walker["status"] == "halted"  # halts again at its start: removed
    assert summary["walkers"][0]["status"] == "completed"
    assert [r["step"] for r in history(tmp_path / "out", 1)] == [0, 0]


def test_bad_walker_inputs_are_refused_before_anything_is_written(model_path, starts, tmp_path, capsys):
    out = tmp_path / "never"
    common = ["md", "--model", str(model_path), "--out", str(out), "--steps", "5"]
    cases = [
        (["--walkers", "3", "--temperature-K", "300,600"], "2 temperatures for 3 walkers"),
        (["--temperature-K", "300,600"], "several temperatures need --walkers"),
        (["--structure", str(starts), str(starts)], "several structures need --walkers"),
        (["--walkers", "2", "--ensemble", "nvt-nose-hoover"], "one thermostat chain"),
        (["--walkers", "0"], "walkers must be an integer >= 1"),
        (["--walkers", "2", "--restart"], "cannot be restarted"),
        (["--respawn"], "--respawn needs --walkers"),
    ]
    si = tmp_path / "si.xyz"
    write(si, molecule("SiH4"))
    cases.append((["--walkers", "2", "--structure", str(starts), str(si)], "unknown element(s) ['Si']"))
    periodic = tmp_path / "cell.extxyz"
    cell = molecule("NH3", vacuum=4.0)
    cell.pbc = True
    write(periodic, cell)
    cases.append((["--walkers", "2", "--structure", str(starts), str(periodic)], "mix periodic and non-periodic"))
    for extra, message in cases:
        assert blip(common + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    assert blip(common + ["--walkers", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith("already exists; pass --overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_blip_md_walkers_writes_a_summary_per_walker_and_a_plot(model_path, tmp_path, capsys):
    out = tmp_path / "out"
    code = blip(["md", "--model", str(model_path), "--out", str(out), "--steps", "20", "--walkers", "3",
                 "--temperature-K", "200,400,600", "--n-samples", "4", "--no-progress"])  # fmt: skip
    assert code == 0
    assert "3 walkers to step 20" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [w["temperature_K"] for w in summary["walkers"]] == [200.0, 400.0, 600.0]
    assert [w["seed"] for w in summary["walkers"]] == [0, 1, 2]
    assert summary["engine"].startswith("torch-sim 0.3.0 nvt_langevin")
    assert (out / "uncertainty.png").stat().st_size > 1000
    assert {r["walker"] for r in read_history(out / "uncertainty.csv")} == {0, 1, 2}


def test_periodic_walkers_in_a_batch_equal_their_single_runs(tmp_path):
    """Bulk cells (per-structure neighbour lists with lattice shifts, torch-sim wrapping positions
    into the cell): a batch of two rattled Mo cells equals two single-walker runs."""
    from ase.build import bulk

    from blip_ase.models.checkpoint import save_checkpoint
    from conftest import build_potential

    model = tmp_path / "mo.pt"
    save_checkpoint(model, build_potential())  # float64, knows H, N, Mo
    cells = []
    for k in range(2):
        cell = bulk("Mo", "bcc", a=3.15, cubic=True).repeat((2, 2, 2))
        cell.rattle(0.05, seed=k)
        cells.append(cell)
    write(tmp_path / "mo.extxyz", cells)
    thresholds = Thresholds(force_std_flag=0.0, force_std_halt=None)
    md = config(model, tmp_path / "batch", ensemble="nve", steps=20, thresholds=thresholds)
    starts, temperatures = tmp_path / "mo.extxyz", (600.0, 1200.0)
    run_walkers(WalkersConfig(md, n_walkers=2, temperatures_K=temperatures, structures=(str(starts),)))
    for k in range(2):
        alone = config(model, tmp_path / f"alone{k}", ensemble="nve", steps=20, seed=k, thresholds=thresholds)
        run_walkers(WalkersConfig(alone, temperatures_K=(temperatures[k],), structures=(f"{starts}@{k}",)))
        frames = read(tmp_path / "batch" / f"walker_{k}.traj", ":")
        assert frames[-1].pbc.all() and np.allclose(frames[-1].cell.array, cells[k].cell.array)
        batch_traj, alone_traj = trajectory(tmp_path / "batch", k), trajectory(tmp_path / f"alone{k}", 0)
        assert np.abs(batch_traj[-1] - batch_traj[0]).max() > 1e-3  # the atoms moved
        np.testing.assert_allclose(batch_traj, alone_traj, rtol=0, atol=1e-9)
        ours, theirs = history(tmp_path / "batch", k), history(Path(alone.out), 0)
        np.testing.assert_allclose([r["max_force_std"] for r in ours], [r["max_force_std"] for r in theirs], rtol=1e-8)
    flagged = read(tmp_path / "batch" / "flagged.extxyz", ":")
    assert {f.info["walker"] for f in flagged} == {0, 1} and all(f.pbc.all() for f in flagged)
