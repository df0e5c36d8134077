"""Uncertainty-monitored MD: policy, exports, halting, crash safety, integrators and ``blip md``.

The halt test and the thermostat/NVE tests use the shipped ammonia model
(blip_ase/assets/ammonia_model.pt); I/O and CLI tests use a tiny random model, which is faster.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import read

from blip_ase.bayes import BayesConfig
from blip_ase.calculator import BLIPCalculator
from blip_ase.cli import md as cli_md
from blip_ase.cli.main import main as blip
from blip_ase.md import (
    ExtXYZFrameWriter,
    FlaggedFrame,
    HDF5FrameWriter,
    MDConfig,
    Thresholds,
    evaluate_frame,
    make_dynamics,
    read_hdf5_frames,
    read_history,
    run_md,
    thermalize,
)
from blip_ase.models import PaiNNConfig, PaiNNPotential
from conftest import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "blip_ase" / "assets" / "ammonia_model.pt"
NH3 = ROOT / "blip_ase" / "assets" / "ammonia_nh3.xyz"
MO_CELL = Path(__file__).parent / "data" / "mo_cell.extxyz"
HOT_K = 900.0  # NH3 leaves its training distribution (<= 5 kcal/mol above the minimum) but holds together
NVE_MAX_DEVIATION_EV = 5e-3  # measured 1.4 meV (seed 0)
NVE_MAX_DRIFT_EV_PER_PS = 5e-3  # measured 2.3 meV/ps (seed 0)


@pytest.fixture(scope="module")
def shipped_model() -> Path:
    assert SHIPPED_MODEL.is_file(), f"the shipped model {SHIPPED_MODEL} is missing (train it: see docs/guide/train.md)"
    return SHIPPED_MODEL


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """Checkpoint of a tiny random Bayesian PaiNN for H and N (fast; forces are smooth)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny.pt")


def stats_for(forces_std: list[float], forces: np.ndarray | None = None, energy_std: float = 0.0) -> dict:
    n = len(forces_std)
    return {
        "energy": 0.0,
        "forces": np.zeros((n, 3)) if forces is None else forces,
        "forces_variance": np.square(forces_std),
        "energy_variance": energy_std**2,
    }


# --- policy -------------------------------------------------------------------------------------


def test_flag_above_halt_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match=r"flag threshold 2 is above the halt threshold 1"):
        Thresholds(force_std_flag=2.0, force_std_halt=1.0)
    with pytest.raises(ValueError, match="energy std per atom"):
        Thresholds(energy_std_flag=0.5, energy_std_halt=0.1)
    with pytest.raises(ValueError, match="unknown element 'Xx'"):
        Thresholds(per_element={"Xx": (0.1, 0.2)})


def test_levels_follow_the_trust_band_with_per_element_thresholds():
    """Strictly above flag -> flag; above halt -> halt; an element's own thresholds win."""
    atoms = Atoms("NHHH", positions=np.arange(12.0).reshape(4, 3))
    policy = Thresholds(force_std_flag=0.2, force_std_halt=1.0, per_element={"H": (0.5, 2.0)})
    ok = evaluate_frame(stats_for([0.2, 0.5, 0.1, 0.1]), atoms, policy)
    assert ok.level == 0 and ok.reason == "" and not ok.flagged_atoms.any()
    flagged = evaluate_frame(stats_for([0.1, 0.6, 0.1, 0.1]), atoms, policy)
    assert flagged.level == 1 and flagged.flagged_atoms.tolist() == [False, True, False, False]
    assert flagged.reason.startswith("flag: max_force_std 0.6 > 0.5 (atom 1 H)")
    halted = evaluate_frame(stats_for([1.1, 1.5, 0.1, 0.1]), atoms, policy)  # H at 1.5 < 2 halts nothing
    assert halted.level == 2 and "atom 0 N" in halted.reason and halted.max_force_std == pytest.approx(1.5)


def test_relative_and_energy_metrics_are_defined_as_documented():
    atoms = Atoms("NH", positions=[[0, 0, 0], [1, 0, 0]])
    forces = np.array([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]])  # |F| = 5 and 0
    policy = Thresholds(relative_flag=0.2, relative_nu=1.0, energy_std_flag=0.05, energy_std_halt=0.1)
    report = evaluate_frame(stats_for([1.2, 0.1], forces, energy_std=0.3), atoms, policy)
    np.testing.assert_allclose(report.relative_force_std, [1.2 / 6.0, 0.1 / 1.0])
    assert report.energy_std_per_atom == pytest.approx(0.15)
    assert report.level == 2 and "energy_std_per_atom 0.15 > 0.1" in report.reason
    assert report.flagged_atoms.tolist() == [False, False]  # 0.2 is not strictly above 0.2


# --- exports ------------------------------------------------------------------------------------


def make_frame(step: int, n: int = 4, periodic: bool = False) -> FlaggedFrame:
    rng = np.random.default_rng(step)
    atoms = Atoms("N" + "H" * (n - 1), positions=rng.normal(size=(n, 3)), cell=4 * np.eye(3), pbc=periodic)
    return FlaggedFrame(
        atoms=atoms,
        step=step,
        time_fs=0.5 * step,
        reason=f"flag: max_force_std {step} > 0.1 (atom 1 H)",
        flagged_atoms=np.arange(n) == 1,
        energy=-1.5 * step,
        energy_variance=0.01 * step,
        forces=rng.normal(size=(n, 3)),
        forces_variance=rng.uniform(size=n),
        stress=rng.normal(size=6) if periodic else None,
        stress_variance=rng.uniform(size=6) if periodic else None,
    )


@pytest.mark.parametrize("periodic", [False, True])
def test_both_exports_round_trip_with_prefixed_keys_that_never_collide_with_labels(tmp_path, periodic):
    frames = [make_frame(step, periodic=periodic) for step in (10, 20, 30)]
    xyz, h5 = ExtXYZFrameWriter(tmp_path / "f.extxyz"), HDF5FrameWriter(tmp_path / "f.h5")
    for frame in frames:
        xyz.write(frame)
        h5.write(frame)
    for read_back in (read(tmp_path / "f.extxyz", ":"), read_hdf5_frames(tmp_path / "f.h5")):
        assert len(read_back) == 3
        for atoms, frame in zip(read_back, frames):
            assert atoms.calc is None and "energy" not in atoms.info and "forces" not in atoms.arrays
            assert atoms.info["step"] == frame.step and atoms.info["time"] == frame.time_fs
            assert atoms.info["reason"] == frame.reason
            assert atoms.info["blip_energy"] == pytest.approx(frame.energy)
            assert atoms.info["blip_energy_variance"] == pytest.approx(frame.energy_variance)
            np.testing.assert_allclose(atoms.positions, frame.atoms.positions, atol=1e-7)
            np.testing.assert_allclose(atoms.arrays["blip_forces"], frame.forces, atol=1e-7)
            np.testing.assert_allclose(atoms.arrays["blip_forces_variance"], frame.forces_variance, atol=1e-7)
            assert atoms.arrays["flagged_atoms"].tolist() == frame.flagged_atoms.tolist()
            assert ("blip_stress" in atoms.info) == periodic


def test_restart_truncation_drops_frames_after_the_restart_step(tmp_path):
    xyz, h5 = ExtXYZFrameWriter(tmp_path / "f.extxyz"), HDF5FrameWriter(tmp_path / "f.h5")
    for step in (10, 20, 30):
        xyz.write(make_frame(step))
        h5.write(make_frame(step))
    reopened = [ExtXYZFrameWriter(tmp_path / "f.extxyz", append=True), HDF5FrameWriter(tmp_path / "f.h5", append=True)]
    for writer in reopened:
        writer.truncate_after(20)
        writer.write(make_frame(25))
    assert [a.info["step"] for a in read(tmp_path / "f.extxyz", ":")] == [10, 20, 25]
    assert [a.info["step"] for a in read_hdf5_frames(tmp_path / "f.h5")] == [10, 20, 25]


def test_frames_of_different_sizes_share_one_hdf5_file_and_truncate_by_step(tmp_path):
    """Walkers of different molecules flag frames of different sizes into one file."""
    h5 = HDF5FrameWriter(tmp_path / "f.h5")
    frames = [make_frame(step, n=n) for step, n in ((10, 4), (20, 6), (30, 3), (40, 6))]
    for frame in frames:
        h5.write(frame)
    back = read_hdf5_frames(tmp_path / "f.h5")
    assert [len(a) for a in back] == [4, 6, 3, 6]
    for atoms, frame in zip(back, frames):
        assert atoms.get_chemical_formula() == frame.atoms.get_chemical_formula()
        np.testing.assert_allclose(atoms.positions, frame.atoms.positions)
        np.testing.assert_allclose(atoms.arrays["blip_forces_variance"], frame.forces_variance)
    reopened = HDF5FrameWriter(tmp_path / "f.h5", append=True)
    reopened.truncate_after(20)
    reopened.write(make_frame(25, n=5))
    back = read_hdf5_frames(tmp_path / "f.h5")
    assert [(a.info["step"], len(a)) for a in back] == [(10, 4), (20, 6), (25, 5)]
    np.testing.assert_allclose(back[2].positions, make_frame(25, n=5).atoms.positions)


def test_a_flagged_file_of_the_one_size_layout_is_read_and_converted_when_appended_to(tmp_path):
    """Runs written before the ragged layout restart without losing their frames."""
    import h5py

    old = [make_frame(step) for step in (10, 20)]
    with h5py.File(tmp_path / "f.h5", "w") as fh:  # the layout before format 2
        fh.attrs["n_frames"] = 2
        fh["numbers"] = old[0].atoms.numbers
        fh["pbc"] = old[0].atoms.pbc
        columns = {"positions": [f.atoms.positions for f in old], "cell": [f.atoms.cell.array for f in old],
                   "blip_energy": [f.energy for f in old], "blip_energy_variance": [f.energy_variance for f in old],
                   "blip_forces": [f.forces for f in old], "blip_forces_variance": [f.forces_variance for f in old],
                   "flagged_atoms": [f.flagged_atoms for f in old], "step": [f.step for f in old],
                   "time": [f.time_fs for f in old], "reason": [f.reason for f in old]}  # fmt: skip
        for name, values in columns.items():
            value = np.asarray(values, dtype=h5py.string_dtype() if name == "reason" else None)
            fh.create_dataset(name, data=value, maxshape=(None, *value.shape[1:]))
    assert [a.info["step"] for a in read_hdf5_frames(tmp_path / "f.h5")] == [10, 20]
    HDF5FrameWriter(tmp_path / "f.h5", append=True).write(make_frame(30, n=6))
    back = read_hdf5_frames(tmp_path / "f.h5")
    assert [(a.info["step"], len(a)) for a in back] == [(10, 4), (20, 4), (30, 6)]
    np.testing.assert_allclose(back[1].arrays["blip_forces"], old[1].forces)
    assert back[0].info["reason"] == old[0].reason


# --- halting with the shipped model ---------------------------------------------------------------


def test_md_halts_at_the_first_checked_frame_above_halt_and_exports_exactly_the_frames_above_flag(
    shipped_model, tmp_path
):
    """Thresholds come from a first (seeded) run's own history, so the test does not depend on the
    model's exact numbers: the halt lies between the running maximum and the next new maximum."""
    base = dict(
        model=str(shipped_model),
        structure=str(NH3),
        steps=300,
        temperature_K=HOT_K,
        uq_interval=10,
        uq_max_interval=10,  # a fixed schedule
        n_samples=8,
        seed=2,
        plot=False,
        screen=False,  # every check draws samples: this test is about the Monte Carlo policy
    )
    run_md(MDConfig(out=str(tmp_path / "probe"), thresholds=Thresholds(force_std_halt=5.0), **base))  # stop blow-ups
    probe = read_history(tmp_path / "probe" / "uncertainty.csv")
    stds = [r["max_force_std"] for r in probe]
    j = next((k for k in range(8, len(stds)) if stds[k] > max(stds[:k]) * 1.001), None)
    assert j is not None, f"no new maximum of the force std after the eighth check: {stds}"
    flag, halt = float(np.median(stds[:j])), 0.5 * (max(stds[:j]) + stds[j])
    summary = run_md(
        MDConfig(out=str(tmp_path / "run"), thresholds=Thresholds(force_std_flag=flag, force_std_halt=halt), **base)
    )
    halt_step = probe[j]["step"]
    assert summary["status"] == "halted" and summary["halt_step"] == halt_step == summary["final_step"]
    assert summary["stop_reason"].startswith(f"step {halt_step}: halt: max_force_std")
    history = read_history(tmp_path / "run" / "uncertainty.csv")
    assert [r["max_force_std"] for r in history] == stds[: j + 1]  # same seed, same trajectory
    expected = [r["step"] for r in probe[: j + 1] if r["max_force_std"] > flag]
    xyz = read(tmp_path / "run" / "flagged.extxyz", ":")
    h5 = read_hdf5_frames(tmp_path / "run" / "flagged.h5")
    assert [a.info["step"] for a in xyz] == [a.info["step"] for a in h5] == expected
    assert summary["n_flagged"] == len(expected) and 3 < len(expected) <= j + 1
    assert xyz[-1].info["reason"].startswith("halt:") and all(a.info["reason"].startswith("flag:") for a in xyz[:-1])
    last = read(tmp_path / "run" / "md.traj", -1)
    assert last.info["step"] == halt_step
    np.testing.assert_allclose(last.positions, xyz[-1].positions, atol=1e-6)


def test_sigkill_during_blip_md_leaves_every_export_readable(tiny_model, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "blip_ase.cli.main", "md", "--model", str(tiny_model), "--structure", str(NH3)]
    cmd += ["--out", str(out), "--steps", "1000000", "--uq-interval", "2", "--flag-force-std-eV-per-A", "0"]
    cmd += ["--halt-force-std-eV-per-A", "none", "--no-progress", "--no-plot", "--traj-interval", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 60
    try:
        while len(read_hdf5_frames_or_none(out / "flagged.h5") or []) < 5:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no flagged frames within 60 s"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    xyz = read(out / "flagged.extxyz", ":")
    h5 = read_hdf5_frames(out / "flagged.h5")
    assert len(h5) >= 5 and len(xyz) in (len(h5), len(h5) + 1)  # killed between the two writes at most
    assert [a.info["step"] for a in h5] == [a.info["step"] for a in xyz[: len(h5)]]
    assert [a.info["step"] for a in xyz] == list(range(0, 2 * len(xyz), 2))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "running" and summary["n_flagged"] >= 1
    history = read_history(out / "uncertainty.csv")
    assert len(history) >= len(xyz)
    assert len(read(out / "md.traj", ":")) >= 1


def read_hdf5_frames_or_none(path: Path):
    """Frames of an HDF5 export that may not exist yet or be open for writing right now."""
    try:
        return read_hdf5_frames(path)
    except Exception:  # absent, or caught in the middle of a write (readers take no lock)
        return None


# --- integrators ----------------------------------------------------------------------------------


def test_nve_with_map_forces_conserves_energy_on_ammonia(shipped_model):
    """400 steps of 0.5 fs from 300 K (seed 0). Measured with the shipped model: max |E - E0| =
    1.4 meV and a drift of 2.3 meV/ps (seeds 1 and 2: 1.9 and 5.8 meV, -0.3 and 0.7 meV/ps)."""
    atoms = read(NH3)
    atoms.calc = BLIPCalculator.from_checkpoint(shipped_model, mode="map", device="cpu")
    thermalize(atoms, 300.0, rng=np.random.default_rng(0))
    dyn = make_dynamics(atoms, "nve", timestep_fs=0.5)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dyn.run(400)
    energies = np.array(energies)
    t_ps = 0.5e-3 * np.arange(len(energies))
    assert np.abs(energies - energies[0]).max() < NVE_MAX_DEVIATION_EV
    assert abs(np.polyfit(t_ps, energies, 1)[0]) < NVE_MAX_DRIFT_EV_PER_PS


def test_langevin_holds_the_average_temperature(shipped_model):
    """Eight NH3 molecules 10 A apart (no edges between them: cutoff 5 A) give 96 degrees of freedom.
    Measured means over 300 fs: 301.5, 313.7, 297.5, 288.7 K for seeds 0-3."""
    molecule = read(NH3)
    atoms = Atoms()
    for k in range(8):
        copy = molecule.copy()
        copy.translate(10.0 * np.array([k % 2, (k // 2) % 2, k // 4]))
        atoms += copy
    atoms.calc = BLIPCalculator.from_checkpoint(shipped_model, mode="map", device="cpu")
    rng = np.random.default_rng(0)
    thermalize(atoms, 300.0, rng=rng)
    dyn = make_dynamics(atoms, "nvt-langevin", timestep_fs=0.5, temperature_K=300.0, friction_per_fs=0.05, rng=rng)
    dyn.run(100)  # equilibrate
    temperatures = []
    dyn.attach(lambda: temperatures.append(atoms.get_temperature()), interval=2)
    dyn.run(600)
    assert np.mean(temperatures) == pytest.approx(300.0, rel=0.1)


def embedded_atom_mo_model() -> PaiNNPotential:
    """A PaiNN set by hand to an embedded-atom potential with its minimum at the DFT bcc cell.

    ``E_i = depth * silu(c * rho_i + b)``, ``rho_i = sum_j sin(pi r/rc)/r * fcut(r)`` (one sine
    basis function, one interaction, no vector features): ``silu`` has its minimum at x = -1.2785,
    placed at the density of the perfect lattice (a = 3.1698 A). Random weights do not do here:
    their bcc lattice is usually not a minimum, so NPT runs of them melt or collapse.
    """
    model = PaiNNPotential([42], PaiNNConfig(n_features=4, n_interactions=1, cutoff=5.0), BayesConfig(p_init=0.1))
    a, rc = 3.16977584, 5.0
    shells = ((8, a * 3**0.5 / 2), (6, a), (12, a * 2**0.5))  # neighbours within the cutoff
    rho0 = sum(n * math.sin(math.pi * r / rc) / r * 0.5 * (math.cos(math.pi * r / rc) + 1) for n, r in shells)
    with torch.no_grad():
        for p in model.net.parameters():
            p.zero_()
        model.net.filter_net.weight[0, 0] = 1.0
        model.net.interactions[0].context_net[2].bias[0] = 1.0
        model.net.readout[0].weight[0, 0] = 4.0 / rho0
        model.net.readout[0].bias[0] = -1.2784645 - 4.0
        model.net.readout[2].weight[0, 0] = 3.0  # bulk modulus about 200 GPa
    return model.eval()


@pytest.mark.parametrize("ensemble", ["npt-mtk-isotropic", "npt-mtk", "npt-berendsen"])
def test_npt_on_periodic_mo_changes_the_volume_and_stays_stable(ensemble):
    """At 5 GPa the cell (zero pressure at the start) shrinks by ~2.5 %; 100 steps of 2 fs."""
    atoms = read(MO_CELL).repeat(2)
    atoms.calc = BLIPCalculator(embedded_atom_mo_model(), mode="map", device="cpu")
    assert abs(atoms.get_stress()[:3].mean()) < 1e-4  # the model's own equilibrium
    rng = np.random.default_rng(0)
    thermalize(atoms, 300.0, rng=rng)
    dyn = make_dynamics(
        atoms,
        ensemble,
        timestep_fs=2.0,
        temperature_K=300.0,
        pressure_bar=5e4,
        pdamp_fs=200.0 if ensemble != "npt-berendsen" else 100.0,
        compressibility_per_bar=5e-7,
        rng=rng,
    )
    v0 = atoms.get_volume()
    volumes, temperatures = [], []
    dyn.attach(lambda: (volumes.append(atoms.get_volume() / v0), temperatures.append(atoms.get_temperature())))
    dyn.run(100)
    assert np.isfinite(atoms.positions).all() and np.isfinite(atoms.get_potential_energy())
    assert 0.9 < min(volumes) and max(volumes) < 1.02
    assert np.mean(volumes[50:]) < 0.99
    assert 100.0 < np.mean(temperatures) < 600.0


# --- blip md: bad input, help, restart ------------------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = blip(["md", *args, "--no-progress", "--no-plot"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_npt_for_a_molecule_fails_before_the_run(tiny_model, tmp_path, capsys):
    args = ("--model", str(tiny_model), "--structure", str(NH3), "--out", str(tmp_path / "o"), "--ensemble", "npt-mtk")
    code, text = run_cli(capsys, *args)
    assert code == 2 and "blip md: error: npt-mtk needs a periodic cell" in text
    assert not (tmp_path / "o" / "md.traj").exists()


def test_npt_with_a_model_without_stress_fails_before_the_run():
    model = embedded_atom_mo_model()
    model.implements_stress = False
    atoms = read(MO_CELL)
    atoms.calc = BLIPCalculator(model, mode="map", device="cpu")
    with pytest.raises(ValueError, match=r"npt-berendsen needs stress, but the model \(PaiNNPotential\) does not"):
        make_dynamics(atoms, "npt-berendsen")


def test_flag_above_halt_is_a_cli_error(tiny_model, tmp_path, capsys):
    code, text = run_cli(
        capsys,
        *("--model", str(tiny_model), "--out", str(tmp_path / "o")),
        *("--flag-force-std-eV-per-A", "2", "--halt-force-std-eV-per-A", "1"),
    )
    assert code == 2 and "flag threshold 2 is above the halt threshold 1" in text


def test_an_unreadable_structure_file_is_named(tiny_model, tmp_path, capsys):
    bad = tmp_path / "broken.xyz"
    bad.write_text("4\nnot a comment line\nN 0 0\n")
    code, text = run_cli(capsys, "--model", str(tiny_model), "--structure", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and f"cannot read structure file {bad}" in text
    missing = tmp_path / "missing.xyz"
    code, text = run_cli(capsys, "--model", str(tiny_model), "--structure", str(missing), "--out", str(tmp_path / "p"))
    assert code == 2 and f"structure file {missing} does not exist" in text


def test_an_existing_output_directory_is_refused_unless_overwrite_or_restart(tiny_model, tmp_path, capsys):
    common = ("--model", str(tiny_model), "--structure", str(NH3), "--out", str(tmp_path / "o"), "--steps", "20")
    assert run_cli(capsys, *common)[0] == 0
    code, text = run_cli(capsys, *common)
    assert code == 2 and "already exists; pass --overwrite or --restart" in text
    assert run_cli(capsys, *common, "--overwrite")[0] == 0
    code, text = run_cli(capsys, *common, "--overwrite", "--restart")
    assert code == 2 and "exclude each other" in text


def test_restart_continues_from_the_last_written_frame(tiny_model, tmp_path, capsys):
    common = ("--model", str(tiny_model), "--structure", str(NH3), "--out", str(tmp_path / "o"))
    common += ("--uq-interval", "5", "--traj-interval", "10", "--flag-force-std-eV-per-A", "0")
    assert run_cli(capsys, *common, "--steps", "30")[0] == 0
    assert run_cli(capsys, *common, "--steps", "60", "--restart")[0] == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (summary["start_step"], summary["final_step"], summary["status"]) == (30, 60, "completed")
    steps = [r["step"] for r in read_history(tmp_path / "o" / "uncertainty.csv")]
    assert steps == list(range(0, 65, 5))
    assert summary["n_checked"] == summary["n_flagged"] == len(steps)
    assert [a.info["step"] for a in read(tmp_path / "o" / "flagged.extxyz", ":")] == steps
    assert [a.info["step"] for a in read(tmp_path / "o" / "md.traj", ":")] == [0, 10, 20, 30, 40, 50, 60]


def test_blip_md_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        blip(["md", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    parser = argparse.ArgumentParser()
    cli_md.add_arguments(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 30
    for action in options:
        name = max(action.option_strings, key=len)
        assert name in text
        assert action.help and action.help != argparse.SUPPRESS
    assert text.count("(default:") == len(options)
    for unit in ("--temperature-K", "--pressure-bar", "--timestep-fs", "--flag-force-std-eV-per-A"):
        assert unit in text


def test_the_main_job_finds_the_shipped_model_and_structure_from_any_directory(tmp_path):
    """README's main job names neither model nor structure; run it (shortened) elsewhere."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "blip_ase.cli.main", "md", "--temperature-K", "1200", "--steps", "20", "--no-progress"]
    cmd += ["--uq-max-interval", "10"]  # a fixed schedule: checks at 0, 10 and 20
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "md_out" / "summary.json").read_text())
    assert Path(summary["model"]) == SHIPPED_MODEL.resolve() and summary["n_checked"] == 3
    assert summary["status"] == "completed" and (tmp_path / "md_out" / "uncertainty.png").is_file()


def test_the_documented_monitor_example_runs(tmp_path, monkeypatch):
    """The Python block of docs/python-api.md's monitor section (formerly README's), as written,
    from an empty directory; its export goes to tmp_path."""
    import re

    text = (ROOT / "docs" / "python-api.md").read_text()
    section = text[text.index("## Monitoring any ASE dynamics") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"flagged.extxyz"' in code
    code = code.replace('"flagged.extxyz"', repr(str(tmp_path / "flagged.extxyz")))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "documented_md_example"}
    exec(compile(code, "docs/python-api.md:monitor example", "exec"), namespace)
    monitor = namespace["monitor"]
    assert monitor.n_checked >= 1 and len(monitor.history) == monitor.n_checked
    if monitor.n_flagged:
        assert len(read(tmp_path / "flagged.extxyz", ":")) == monitor.n_flagged


# --- misuse: non-finite predictions, exit codes, strict JSON --------------------------------------


def strict_json(path: Path) -> dict:
    """``path`` parsed as strict JSON: a bare NaN or Infinity (invalid JSON) fails the test."""

    def reject(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def coincident_nh3(path: Path) -> Path:
    """NH3 with two hydrogens on the same spot: every prediction of the model is NaN."""
    Atoms("NHHH", positions=[[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]]).write(path)
    return path


def test_a_non_finite_prediction_halts_at_once_with_its_own_reason_and_exports_the_frame(tiny_model, tmp_path, capsys):
    """Before: NaN compared False with every threshold, so the frame passed as level 0, the next
    step failed with "positions contain NaN" and summary.json held a bare NaN."""
    structure = coincident_nh3(tmp_path / "coincident.xyz")
    out = tmp_path / "o"
    code, text = run_cli(capsys, "--model", str(tiny_model), "--structure", str(structure), "--out", str(out))
    assert code == 0, text
    summary = strict_json(out / "summary.json")
    assert summary["status"] == "halted" and summary["halt_step"] == 0 == summary["final_step"]
    assert "non-finite prediction: energy, forces" in summary["stop_reason"]
    assert summary["max_force_std_max"] is None
    (frame,) = read(out / "flagged.extxyz", ":")
    assert frame.info["step"] == 0 and frame.info["reason"].startswith("halt: non-finite prediction")
    assert [a.info["step"] for a in read_hdf5_frames(out / "flagged.h5")] == [0]


def test_a_nan_force_between_two_checks_halts_at_that_step(tiny_model):
    """MAP forces move the atoms every step, the uncertainty is checked every 100: a NaN force at
    step 3 must stop the run at step 3, not be propagated into NaN positions."""
    from blip_ase.md import UncertaintyMonitor

    atoms = read(NH3)
    atoms.calc = BLIPCalculator.from_checkpoint(tiny_model, mode="map", n_samples=4, seed=0, device="cpu")
    thermalize(atoms, 300.0, rng=np.random.default_rng(0))
    dyn = make_dynamics(atoms, "nve")

    def collide():  # the real model, driven onto a configuration where it returns NaN
        if dyn.nsteps == 3:
            atoms.positions[2] = atoms.positions[1]
            atoms.get_forces()

    dyn.attach(collide, interval=1)
    monitor = UncertaintyMonitor(dyn, thresholds=Thresholds(force_std_halt=100.0))
    dyn.attach(monitor, interval=100)
    dyn.attach(monitor.check_finite, interval=1)
    dyn.run(50)
    assert dyn.nsteps == 3 and monitor.triggered and monitor.halt_step == 3
    assert monitor.stop_reason.startswith("step 3: halt: non-finite prediction")
    assert [r["step"] for r in monitor.history] == [0, 3]


def test_every_json_file_is_strict_json_with_non_finite_numbers_as_null(tmp_path):
    from blip_ase.strict_json import write_json

    write_json(tmp_path / "a.json", {"nan": float("nan"), "inf": np.float32(np.inf), "x": np.arange(2.0), "ok": 1.5})
    assert strict_json(tmp_path / "a.json") == {"nan": None, "inf": None, "x": [0.0, 1.0], "ok": 1.5}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_blip_md_with_exit_code_128_plus_the_signal_recorded_in_the_summary(tiny_model, tmp_path, sig):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "blip_ase.cli.main", "md", "--model", str(tiny_model), "--structure", str(NH3)]
    cmd += ["--out", str(out), "--steps", "1000000", "--no-progress", "--no-plot", "--traj-interval", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 60
    try:
        while not (out / "summary.json").is_file() or len(read_history(out / "uncertainty.csv")) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checks within 60 s"
            time.sleep(0.1)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, proc.stderr.read().decode()
    summary = strict_json(out / "summary.json")
    name = signal.Signals(sig).name
    assert summary["status"] == "interrupted" and summary["signal"] == name
    assert summary["stop_reason"] == f"step {summary['final_step']}: interrupted by {name}"
    assert read(out / "md.traj", -1).info["step"] == summary["final_step"]


def test_a_run_that_fails_after_the_start_exits_1_and_says_failed(tiny_model, tmp_path, capsys, monkeypatch):
    """Fault injection: the calculator raises at its 6th call (an error inside the dynamics)."""
    calls = {"n": 0}
    original = BLIPCalculator.calculate

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected fault")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BLIPCalculator, "calculate", failing)
    out = tmp_path / "o"
    code, text = run_cli(capsys, "--model", str(tiny_model), "--structure", str(NH3), "--out", str(out))
    assert code == 1 and "blip md: failed: the run failed at step" in text and "injected fault" in text
    summary = strict_json(out / "summary.json")
    assert summary["status"] == "failed" and "injected fault" in summary["error"]


def test_blip_md_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        blip(["md", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("0 completed or halted", "1 failed", "2 bad input", "130", "SIGINT", "143", "SIGTERM"):
        assert phrase in text


def test_an_unavailable_device_is_one_line_in_every_command(tiny_model, tmp_path, capsys):
    """CPU torch: ``--device cuda`` was a 20-line traceback; now one line, before any output."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    common = {"md": ["--model", str(tiny_model)], "eval": ["--model", str(tiny_model), "--data", str(NH3)]}
    common["calibrate"] = ["--model", str(tiny_model), "--data", str(NH3)]
    common["train"] = [str(ROOT / "examples" / "ammonia" / "config.yaml"), "--train", str(NH3), "--val", str(NH3)]
    for command, args in common.items():
        code = blip([command, *args, "--out", str(tmp_path / command), "--device", "cuda"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (command, lines)
        assert lines[0].startswith(f"blip {command}: error: device 'cuda' is not available")
        assert not (tmp_path / command).exists()
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        BLIPCalculator.from_checkpoint(tiny_model, device="cuda")


# --- misuse: inputs checked before anything is created; restart rules ------------------------------


def write_structure(path: Path, symbols: str, positions) -> Path:
    Atoms(symbols, positions=positions).write(path)
    return path


@pytest.mark.parametrize(
    "case",
    ["unknown element", "nan positions", "element threshold", "bad timestep"],
)
def test_bad_inputs_are_refused_before_the_output_directory_is_created(tiny_model, tmp_path, capsys, case):
    """Before: an unknown element was found after md_out/ existed (the corrected re-run then needed
    --overwrite), NaN positions gave "Eigenvalues did not converge", and an --element-threshold for
    an element the model does not know was silently accepted."""
    ok = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    structure, extra, expected = NH3, [], ""
    if case == "unknown element":
        structure = write_structure(tmp_path / "c.xyz", "CHHH", ok)
        expected = "unknown element(s) ['C']: the model knows only ['H', 'N']"
    elif case == "nan positions":
        structure = write_structure(tmp_path / "nan.xyz", "NHHH", [[0, 0, 0], [np.nan, 0, 0], [0, 1, 0], [0, 0, 1]])
        expected = "positions contain NaN or infinite values (atoms [1])"
    elif case == "element threshold":
        extra, expected = ["--element-threshold", "C=0.1,0.2"], "for ['C']: the model knows only ['H', 'N']"
    else:
        extra, expected = ["--timestep-fs", "0"], "timestep_fs must be > 0"
    out = tmp_path / "o"
    code, text = run_cli(capsys, "--model", str(tiny_model), "--structure", str(structure), "--out", str(out), *extra)
    assert code == 2 and expected in text, text
    assert "Eigenvalues" not in text and len(text.strip().splitlines()) == 1
    assert not out.exists()


def test_restart_takes_every_setting_from_the_stored_run(tiny_model, tmp_path, capsys):
    """Before: ``--restart --out o --steps N`` continued a 1200 K run at the 300 K default."""
    out = tmp_path / "o"
    first = ("--model", str(tiny_model), "--out", str(out), "--temperature-K", "1200", "--ensemble", "nvt-bussi")
    first += ("--no-physical-checks",)  # the tiny random model at 1200 K falls apart; this test is about restart
    assert run_cli(capsys, *first, "--steps", "20", "--flag-force-std-eV-per-A", "0.01", "--seed", "3")[0] == 0
    code, text = run_cli(capsys, "--restart", "--out", str(out), "--steps", "40", "--traj-interval", "5")
    assert code == 0, text
    summary = strict_json(out / "summary.json")
    config = summary["config"]
    assert (config["temperature_K"], config["ensemble"], config["seed"]) == (1200.0, "nvt-bussi", 3)
    assert config["thresholds"]["force_std_flag"] == 0.01 and config["traj_interval"] == 5
    assert Path(config["model"]) == tiny_model.resolve() and summary["final_step"] == 40


def test_restart_refuses_an_option_that_contradicts_the_stored_run(tiny_model, tmp_path, capsys):
    out = tmp_path / "o"
    first = ("--model", str(tiny_model), "--out", str(out), "--temperature-K", "1200", "--steps", "10")
    assert run_cli(capsys, *first)[0] == 0
    for option, message in (
        (["--ensemble", "nve"], "--ensemble 'nve' (the run has 'nvt-langevin')"),
        (["--temperature-K", "300"], "--temperature-K 300.0 (the run has 1200.0)"),  # the default, but given
        (["--halt-force-std-eV-per-A", "2"], "the threshold options"),
        (["--model", str(NH3)], "--model"),
    ):
        code, text = run_cli(capsys, "--restart", "--out", str(out), "--steps", "20", *option)
        assert code == 2 and "contradict" in text and message in text, text
        assert "Only --steps, --traj-interval, --uq-interval" in text
    assert strict_json(out / "summary.json")["final_step"] == 10  # nothing ran


@pytest.mark.parametrize("ensemble", ["nvt-nose-hoover"])
def test_a_nose_hoover_or_mtk_run_refuses_restart_saying_why(tiny_model, tmp_path, capsys, ensemble):
    """Their thermostat chain state lives inside ASE's integrator and md.traj does not hold it."""
    out = tmp_path / "o"
    first = ("--model", str(tiny_model), "--out", str(out), "--ensemble", ensemble, "--steps", "10")
    assert run_cli(capsys, *first)[0] == 0
    code, text = run_cli(capsys, "--restart", "--out", str(out), "--steps", "20")
    assert code == 2 and f"cannot restart a {ensemble} run" in text and "thermostat/barostat state" in text
    assert f"--structure {out / 'md.traj'}@-1" in text
    last_frame = f"{out / 'md.traj'}@-1"
    new_run = ("--model", str(tiny_model), "--structure", last_frame, "--out", str(tmp_path / "p"), "--steps", "10")
    code, text = run_cli(capsys, *new_run)
    assert code == 0, text


def test_a_signal_whose_exception_python_swallowed_still_interrupts_at_the_next_step(tiny_model, tmp_path):
    """A handler's exception raised inside a weakref callback or ``__del__`` is printed as
    "Exception ignored" and lost (seen: a Ctrl-C of blip learn that ran on to the end). The
    handlers record the signal and every MD step raises it again."""
    from blip_ase import interrupts
    from blip_ase.md.lifecycle import Interrupted

    try:
        interrupts.handler(Interrupted)(signal.SIGTERM, None)
    except KeyboardInterrupt:
        pass  # what Python does with it inside a garbage-collection callback
    config = MDConfig(model=str(tiny_model), structure=str(NH3), out=str(tmp_path / "o"), steps=50, plot=False)
    summary = run_md(config)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["final_step"] <= 1
    assert run_md(MDConfig(**{**config.__dict__, "out": str(tmp_path / "p")}))["status"] == "completed"
