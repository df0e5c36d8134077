"""Physical checks of monitored MD (``blip_ase.md.physics``): each fires on a constructed trajectory
with its own reason, none fires on the shipped model's normal runs, ``run_md`` and the walkers give
the same verdicts, and the written summaries, histories and plots say what happened."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import molecule
from ase.io import read, write

from blip_ase.cli.main import main as blip
from blip_ase.md import MDConfig, PhysicalChecks, Thresholds, plot_history, read_history, run_md
from blip_ase.md.physics import bond_fragments
from blip_ase.md.tracker import Tracker
from conftest import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "blip_ase" / "assets" / "ammonia_model.pt"
NH3 = ROOT / "blip_ase" / "assets" / "ammonia_nh3.xyz"
NONE = {"bond_factor": None, "isolated": False, "min_distance_factor": None, "temperature_factor": None}
NONE["energy_jump_eV_per_atom"] = None
ONLY = {  # one check at a time
    "fragmented": PhysicalChecks(**{**NONE, "bond_factor": 1.5, "isolated": True}),
    "too_close": PhysicalChecks(**{**NONE, "min_distance_factor": 0.5}),
    "temperature_runaway": PhysicalChecks(**{**NONE, "temperature_factor": 3.0}),
    "energy_jump": PhysicalChecks(**{**NONE, "energy_jump_eV_per_atom": 0.5}),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny64.pt", dtype=torch.float64)


def quiet_stats(n: int, energy: float = 0.0) -> dict:
    """Monte Carlo statistics of a model that is certain (what it says of an isolated atom)."""
    return {"energy": energy, "forces": np.zeros((n, 3)), "forces_variance": np.zeros(n), "energy_variance": 0.0}


def replay(frames, checks: PhysicalChecks, *, temperatures=None, energies=None, target_K=300.0) -> Tracker:
    """Check ``frames`` in order with a tracker whose only policy is ``checks``."""
    tracker = Tracker(Thresholds(), physical=checks, reference=frames[0], cutoff_A=5.0, target_K=target_K)
    for k, atoms in enumerate(frames):
        T = 300.0 if temperatures is None else temperatures[k]
        E = 0.0 if energies is None else energies[k]
        report = tracker.check(atoms, quiet_stats(len(atoms), E), step=10 * k, time_fs=5.0 * k, temperature_K=T)
        if report.level == 2:
            break
    return tracker


def pulled(distance: float) -> Atoms:
    """NH3 with one H pulled ``distance`` A further out along its bond."""
    atoms = molecule("NH3")
    bond = atoms.positions[1] - atoms.positions[0]
    atoms.positions[1] += distance * bond / np.linalg.norm(bond)
    return atoms


# --- each check fires on a constructed trajectory, with its own reason -------------------------


def test_two_fragments_pulled_apart_halt_as_fragmented_once_the_bond_is_gone():
    frames = [pulled(d) for d in (0.0, 0.2, 0.4, 0.8, 1.5)]  # bonded below 1.5 x (0.71 + 0.31) = 1.53 A
    tracker = replay(frames, ONLY["fragmented"])
    assert tracker.halted and tracker.halt_step == 30 and tracker.stop_check == "fragmented"
    assert "bond graph split into 2 fragments (start 1); atoms 0 N and 1 H, bonded at the start, are 1.82 A apart" in (
        tracker.stop_reason
    )
    assert [r["check"] for r in tracker.history] == ["", "", "", "fragmented"]


def test_an_atom_without_neighbour_within_the_cutoff_is_fragmented_also_in_a_periodic_cell():
    far = pulled(6.0)  # the model sees it as alone: zero force, zero force std
    tracker = replay([far], ONLY["fragmented"])
    assert tracker.stop_check == "fragmented"
    assert "atom 1 H has no neighbour within the model cutoff 5 A" in tracker.stop_reason
    start, cell = pulled(0.0), pulled(1.0)  # split bond graph, but periodic cells use the cutoff rule only
    for atoms in (start, cell):
        atoms.cell, atoms.pbc = [20.0, 20.0, 20.0], True
    assert not replay([start, cell], ONLY["fragmented"]).halted
    alone = pulled(8.0)
    alone.cell, alone.pbc = [30.0, 30.0, 30.0], True
    assert replay([alone], ONLY["fragmented"]).stop_check == "fragmented"


def test_atoms_pushed_together_halt_as_too_close():
    frames = []
    for d in (1.6, 1.0, 0.5, 0.25):  # two H atoms pushed together; 0.5 x (0.31 + 0.31) = 0.31 A
        atoms = molecule("NH3")
        mid = 0.5 * (atoms.positions[1] + atoms.positions[2])
        u = (atoms.positions[1] - atoms.positions[2]) / np.linalg.norm(atoms.positions[1] - atoms.positions[2])
        atoms.positions[1], atoms.positions[2] = mid + 0.5 * d * u, mid - 0.5 * d * u
        frames.append(atoms)
    tracker = replay(frames, ONLY["too_close"])
    assert tracker.halt_step == 30 and tracker.stop_check == "too_close"
    assert "too_close: atoms 1 H and 2 H are 0.25 A apart" in tracker.stop_reason


def test_a_temperature_far_above_the_target_for_several_checks_is_a_runaway():
    nh3 = molecule("NH3")
    spikes = [300, 1200, 300, 1200, 1200, 1200, 1200, 300]  # four hot checks in a row: not yet
    assert not replay([nh3] * len(spikes), ONLY["temperature_runaway"], temperatures=spikes).halted
    hot = [300, 1000, 1000, 1000, 1000, 1000, 300]
    tracker = replay([nh3] * len(hot), ONLY["temperature_runaway"], temperatures=hot)
    assert tracker.halt_step == 50 and tracker.stop_check == "temperature_runaway"
    assert "above 3 x 300 K at 5 consecutive checks" in tracker.stop_reason


def test_a_thermostat_set_far_too_hot_halts_the_monitored_dynamics(tiny_model):
    """Real dynamics: the monitor's target is 300 K, the thermostat heats to 5000 K."""
    from ase.md.langevin import Langevin

    from blip_ase import BLIPCalculator
    from blip_ase.md import UncertaintyMonitor

    atoms = molecule("NH3")
    atoms.calc = BLIPCalculator.from_checkpoint(tiny_model, mode="map", n_samples=4, seed=0)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=5000, friction=0.1 / units.fs, fixcm=False,
                   rng=np.random.default_rng(0))  # fmt: skip
    monitor = UncertaintyMonitor(dyn, physical=ONLY["temperature_runaway"], temperature_K=300)
    dyn.attach(monitor, interval=10)
    dyn.run(2000)
    assert monitor.triggered and monitor.tracker.stop_check == "temperature_runaway", monitor.history[-1]
    assert dyn.nsteps == monitor.halt_step < 2000


def test_an_energy_jump_between_checks_halts():
    nh3 = molecule("NH3")
    energies = [-10.0, -10.2, -9.9, -5.0]  # eV; the last is 1.2 eV/atom above the one before
    tracker = replay([nh3] * 4, ONLY["energy_jump"], energies=energies)
    assert tracker.halt_step == 30 and tracker.stop_check == "energy_jump"
    assert "total energy changed by +1.23 eV/atom" in tracker.stop_reason


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="bond_factor must be a finite number > 0"):
        PhysicalChecks(bond_factor=-1.0)
    with pytest.raises(ValueError, match="temperature_checks must be an integer >= 1"):
        PhysicalChecks(temperature_checks=0)
    with pytest.raises(ValueError, match="min_distance_factor 2 must be below bond_factor 1.5"):
        PhysicalChecks(min_distance_factor=2.0)
    with pytest.raises(ValueError, match=r"unknown physical check settings \['bond'\]"):
        MDConfig(physical={"bond": 1.0})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bond'\] in physical"):
        MDConfig.from_dict({"physical": {"bond": 1.0}})
    assert not MDConfig.from_dict({"physical": {"enabled": False}}).physical.enabled
    assert not MDConfig(physical=None).physical.enabled


def test_the_bond_graph_of_nh3_is_one_fragment():
    assert len(set(bond_fragments(molecule("NH3"), 1.5))) == 1


# --- the shipped model: quiet on normal runs, halting when NH3 falls apart ------------------------


@pytest.mark.parametrize(("temperature", "seed"), [(300.0, 0), (1200.0, 0)])
def test_no_physical_check_fires_on_normal_runs_of_the_shipped_model(tmp_path, temperature, seed):
    config = MDConfig(model=str(SHIPPED_MODEL), out=str(tmp_path / "o"), temperature_K=temperature, seed=seed,
                      steps=400, n_samples=4, plot=False)  # fmt: skip
    summary = run_md(config)
    assert summary["status"] == "completed" and summary["stop_check"] is None, summary["stop_reason"]
    assert {r["check"] for r in read_history(tmp_path / "o" / "uncertainty.csv")} == {""}


@pytest.mark.filterwarnings("ignore:The implementation of `fixcm=True`:FutureWarning")
def test_the_readme_900_K_example_halts_when_nh3_falls_apart(tmp_path):
    """README's Python monitor example as written (Langevin NH3 900 K, 0.5 fs, friction 0.01/fs,
    ASE's default ``fixcm=True``, rng seed 0, checks every 10 steps): before, it ended with the
    atoms 8-11 A apart, ``halted False``, because an isolated atom has zero force std. Measured:
    halts at step 140, an H 1.65 A from the N (normal 300-1200 K runs stay below 1.25 A)."""
    from ase.md.langevin import Langevin

    from blip_ase import BLIPCalculator
    from blip_ase.md import UncertaintyMonitor

    atoms = read(NH3)
    atoms.calc = BLIPCalculator.from_checkpoint(SHIPPED_MODEL, mode="map", n_samples=16, seed=0)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=900, friction=0.01 / units.fs, rng=np.random.default_rng(0))
    monitor = UncertaintyMonitor(dyn, thresholds=Thresholds(force_std_flag=0.25, force_std_halt=1.0))
    dyn.attach(monitor, interval=10)
    dyn.run(1000)
    assert monitor.triggered and monitor.tracker.stop_check == "fragmented", monitor.stop_reason
    assert dyn.nsteps == monitor.halt_step < 1000
    assert atoms.get_all_distances()[0, 1:].max() > 1.53  # an H left the N


# --- one verdict for run_md and the walkers; what the files say ----------------------------------


def test_run_md_and_a_batch_of_walkers_give_the_same_verdict_and_the_broken_walker_halts_alone(tiny_model, tmp_path):
    from blip_ase.md.walkers import WalkersConfig, run_walkers

    broken = tmp_path / "broken.xyz"
    write(broken, pulled(6.0))  # one H 6 A away: zero force std, but not a molecule any more
    base = dict(model=str(tiny_model), steps=30, uq_interval=5, traj_interval=5, n_samples=4, ensemble="nve")
    alone = run_md(MDConfig(out=str(tmp_path / "alone"), structure=str(broken), plot=False, **base))
    assert alone["status"] == "halted" and alone["halt_step"] == 0 and alone["stop_check"] == "fragmented"
    good = tmp_path / "good.xyz"
    write(good, molecule("NH3"))
    md = MDConfig(out=str(tmp_path / "batch"), **base)
    summary = run_walkers(WalkersConfig(md, n_walkers=3, structures=(str(good), str(broken), str(good))))
    statuses = [w["status"] for w in summary["walkers"]]
    assert summary["status"] == "completed" and statuses == ["completed", "halted", "completed"]
    walker = summary["walkers"][1]
    assert walker["stop_check"] == "fragmented" and walker["stop_reason"] == alone["stop_reason"]
    assert (summary["n_running"], summary["n_completed"], summary["n_halted"]) == (0, 2, 1)
    stored = json.loads((tmp_path / "batch" / "summary.json").read_text())
    assert (stored["n_running"], stored["n_completed"], stored["n_halted"]) == (0, 2, 1)
    rows = read_history(tmp_path / "batch" / "uncertainty.csv")
    assert [(r["walker"], r["step"], r["check"]) for r in rows if r["check"]] == [(1, 0, "fragmented")]
    fig = plot_history(tmp_path / "w.png", rows, flag=None, halt=None, labels={0: "a", 1: "b", 2: "c"})
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["a", "b", "c", "halted: fragmented (1)"]
    box = fig.axes[0].get_legend().get_window_extent()
    assert box.x0 >= fig.axes[0].get_window_extent().x1  # outside the axes, over no point


def test_the_md_plot_legend_shows_only_what_happened_on_a_step_axis(tiny_model, tmp_path):
    out = tmp_path / "o"
    run_md(MDConfig(model=str(tiny_model), out=str(out), steps=20, n_samples=4, temperature_K=100,
                    thresholds=Thresholds(force_std_flag=None, force_std_halt=50.0)))  # fmt: skip
    history = read_history(out / "uncertainty.csv")
    fig = plot_history(tmp_path / "p.png", history, flag=None, halt=50.0)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["max atomic force std", "halt = 50 eV/A"]  # nothing flagged, nothing halted
    assert fig.axes[1].get_xlabel() == "step" and (out / "uncertainty.png").is_file()
    halted = [dict(r, level=2, check="fragmented") if r["step"] == 20 else r for r in history]
    fig = plot_history(tmp_path / "q.png", halted, flag=None, halt=50.0)
    assert "halted: fragmented (1)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_blip_md_stores_the_physical_checks_and_a_restart_keeps_them(tiny_model, tmp_path, capsys):
    out = tmp_path / "o"
    common = ["md", "--model", str(tiny_model), "--out", str(out), "--no-progress", "--no-plot"]
    assert blip([*common, "--steps", "10", "--bond-factor", "1.8", "--runaway-temperature-factor", "none"]) == 0
    stored = json.loads((out / "summary.json").read_text())["config"]["physical"]
    assert stored["bond_factor"] == 1.8 and stored["temperature_factor"] is None
    assert blip(["md", "--restart", "--out", str(out), "--steps", "20", "--no-progress", "--no-plot"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["physical"] == stored
    capsys.readouterr()
    assert blip(["md", "--restart", "--out", str(out), "--steps", "30", "--bond-factor", "2"]) == 2
    assert "the physical-check options" in capsys.readouterr().err


def test_the_restart_refusal_lists_only_real_flags(tiny_model, tmp_path, capsys):
    import argparse
    import re

    from blip_ase.cli import md as cli_md

    out = tmp_path / "o"
    first = ["md", "--model", str(tiny_model), "--out", str(out), "--steps", "10", "--no-progress", "--no-plot"]
    assert blip(first) == 0
    capsys.readouterr()
    assert blip(["md", "--restart", "--out", str(out), "--steps", "20", "--seed", "5"]) == 2
    allowed = re.search(r"Only (.*) may change", capsys.readouterr().err).group(1)
    flags = re.findall(r"--[\w-]+", allowed)
    md_parser = argparse.ArgumentParser()
    cli_md.add_arguments(md_parser)
    known = {s for action in md_parser._actions for s in action.option_strings}
    assert flags and set(flags) <= known, set(flags) - known
    assert "--no-progress" in flags and "--no-plot" in flags and "--summary-every-s" not in allowed
