"""``blip learn``: selection, oracles, the loop end to end, restart after a kill, bad input.

The loop tests run real components: ``blip md`` exploration with a tiny BLIP-PaiNN, ASE's EMT
(and PySCF HF/STO-3G when installed) as oracles, real fine-tuning and calibration.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from blip_ase.active import farthest_point_sampling, load_learn_config, run_learn, select
from blip_ase.active.config import OracleConfig, SelectConfig
from blip_ase.active.oracle import check_oracle, label_frames, label_one
from blip_ase.active.selection import AtomDescriptors, descriptors
from blip_ase.cli.main import main
from blip_ase.md import Thresholds
from blip_ase.training import TrainConfig, train
from blip_ase.training.config import from_dict

# the tiny random Cu models push atoms to 1.2 A: the physical checks would halt every walker, and
# these tests are about the loop, not about the monitor (tests/test_physical_checks.py)
FAST_MD = {"timestep_fs": 2.0, "uq_interval": 5, "n_samples": 4, "physical": {"enabled": False}}
TINY_TRAIN = {
    "painn": {"n_features": 8, "n_interactions": 1, "n_rbf": 6, "cutoff": 3.5},
    "bayes": {"hidden": 8, "n_hidden": 1, "n_rbf": 6, "p_init": 0.1, "kl_weight": 1.0e-3},
    "epochs": 5, "batch_size": 8, "progress": False,
}  # fmt: skip


def _labelled(atoms: Atoms, calc) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def _start_model(root: Path, frames: list[Atoms], start: Atoms) -> None:
    write(root / "train.extxyz", frames[: len(frames) * 3 // 5])
    write(root / "val.extxyz", frames[len(frames) * 3 // 5 :])
    write(root / "start.xyz", start)
    train(from_dict(TrainConfig, TINY_TRAIN), root / "train.extxyz", root / "val.extxyz", root / "model0")


@pytest.fixture(scope="module")
def cu_root(tmp_path_factory) -> Path:
    """A periodic 4-atom Cu cell: 14 rattled EMT frames and a tiny BLIP model trained on 8 of them."""
    root = tmp_path_factory.mktemp("cu")
    cell = bulk("Cu", "fcc", a=3.6, cubic=True)
    frames = []
    for k in range(14):
        a = cell.copy()
        a.rattle(0.05, seed=k)
        frames.append(_labelled(a, EMT()))
    _start_model(root, frames, cell)
    return root


def _config(root: Path, name: str = "learn.yaml", **sections) -> Path:
    """A learn config for the Cu setup: every check flagged (flag 0), so rounds go on until
    ``max_rounds``; ``sections`` replace or extend the defaults."""
    data = {
        "model": "model0/model.pt", "train_data": "train.extxyz", "val_data": "val.extxyz",
        "explore": {"structures": ["start.xyz"], "temperatures_K": [600, 1200], "steps": 30,
                    "md": {**FAST_MD, "thresholds": {"force_std_flag": 0.0}}},
        "select": {"budget": 4},
        "oracle": {"kind": "ase", "calculator": "ase.calculators.emt:EMT", "workers": 1},
        "train": {"config": {"epochs": 2}, "calibration_samples": 4},
        "stop": {"max_rounds": 1, "max_flagged_fraction": 0.5},
    }  # fmt: skip
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------- selection


def test_fps_on_points_on_a_line_returns_the_ends_then_the_middle():
    desc = np.arange(11.0)[:, None]
    assert farthest_point_sampling(desc, 3) == [0, 10, 5]


def test_fps_on_a_square_with_a_centre_picks_the_opposite_corner_second():
    desc = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    chosen = farthest_point_sampling(desc, 4)
    assert chosen[:2] == [0, 3] and set(chosen[2:]) == {1, 2}


def test_weighted_fps_starts_at_the_most_uncertain_frame():
    desc = np.arange(5.0)[:, None]
    assert select(desc, np.array([0.1, 0.2, 0.9, 0.3, 0.1]), SelectConfig(budget=1))[0] == 2


def test_near_duplicates_are_dropped_and_the_budget_is_respected():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 3)) * 10
    desc = np.concatenate([centres, centres + 1e-4])  # every frame has a twin at distance < 0.001
    uncertainty = rng.uniform(size=8)
    for strategy in ("fps", "max_variance"):
        config = SelectConfig(strategy=strategy, budget=10, min_distance=0.01)
        chosen = select(desc, uncertainty, config)
        assert len(chosen) == 4 and len({i % 4 for i in chosen}) == 4, strategy
        assert len(select(desc, uncertainty, SelectConfig(strategy=strategy, budget=3, min_distance=0.01))) == 3
        assert select(desc, uncertainty, config, reference=centres[:3]) in ([3], [7]), strategy


def test_the_same_seed_gives_the_same_selection_and_another_seed_another():
    desc, uncertainty = np.random.default_rng(1).normal(size=(40, 5)), np.random.default_rng(2).uniform(size=40)
    for strategy in ("fps", "max_variance", "random"):
        a = select(desc, uncertainty, SelectConfig(strategy=strategy, budget=6, seed=3))
        assert a == select(desc, uncertainty, SelectConfig(strategy=strategy, budget=6, seed=3))
    assert a != select(desc, uncertainty, SelectConfig(strategy="random", budget=6, seed=4))


def _atom_set(frames: list[np.ndarray], species: list[np.ndarray]) -> AtomDescriptors:
    return AtomDescriptors(np.concatenate(frames), np.concatenate(species),
                           np.repeat(np.arange(len(frames)), [len(f) for f in frames]), len(frames))  # fmt: skip


def test_atom_fps_picks_the_frame_with_one_novel_atom_that_the_mean_dilutes():
    """Frame 0: every atom a little off the labelled ones; frame 1: one atom far off, the rest
    labelled. The mean-pooled distance prefers frame 0, the atom-wise one frame 1."""
    labelled = [np.zeros((8, 2))]
    species = [np.ones(8, int)]
    spread = np.full((8, 2), 0.3)
    one_novel = np.zeros((8, 2))
    one_novel[3] = [1.5, 0.0]
    pool = [spread, one_novel]
    mean = select(np.stack([f.mean(0) for f in pool]), np.ones(2), SelectConfig(budget=1),
                  reference=np.stack([f.mean(0) for f in labelled]))  # fmt: skip
    atoms = select(_atom_set(pool, species * 2), np.ones(2), SelectConfig(budget=1, descriptor="atoms"),
                   reference=_atom_set(labelled, species))  # fmt: skip
    assert mean == [0] and atoms == [1]


def test_atom_fps_compares_atoms_of_one_element_only_and_drops_duplicates():
    """An H atom is not 'near' a labelled N atom however close their features; a frame whose
    every atom has a labelled twin is a near-duplicate."""
    h, n = np.array([1]), np.array([7])
    labelled = _atom_set([np.array([[0.0, 0.0]])], [n])
    pool = _atom_set([np.array([[0.0, 0.0]]), np.array([[0.5, 0.0]]), np.array([[0.001, 0.0]])], [h, h, n])
    cfg = SelectConfig(budget=3, descriptor="atoms", min_distance=0.01)
    assert select(pool, np.array([1.0, 0.5, 1.0]), cfg, reference=labelled) == [0, 1]


def test_descriptors_are_invariant_to_rotation_and_atom_order_and_tell_structures_apart(cu_root):
    from blip_ase.models.checkpoint import load_checkpoint

    model = load_checkpoint(cu_root / "model0" / "model.pt")[0]
    frames = read(cu_root / "train.extxyz", ":")[:2]
    moved = frames[0].copy()
    moved.rotate(40, "z", rotate_cell=True)
    moved = moved[[2, 0, 3, 1]]
    d = descriptors(model, [frames[0], moved, frames[1]])
    assert np.allclose(d[0], d[1], atol=1e-6)
    assert np.linalg.norm(d[0] - d[2]) > 1e-4
    per_atom = descriptors(model, [frames[0], moved, frames[1]], per_atom=True)
    assert per_atom.features.shape == (12, d.shape[1]) and per_atom.owner.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    np.testing.assert_allclose(per_atom.features[:4].mean(0), d[0], atol=1e-12)  # the mean is the pooled one
    np.testing.assert_allclose(np.sort(per_atom.features[:4], 0), np.sort(per_atom.features[4:8], 0), atol=1e-6)


def test_an_orb_model_gives_descriptors_so_fps_selection_works_for_it():
    """Issue 19 item 6: selection went through PaiNN's readout, so ORB could only select at random."""
    import torch

    from blip_ase.models.orb import ORB_BAYES, OrbConfig, OrbPotential

    torch.manual_seed(0)
    tiny = OrbConfig(latent_dim=16, base_mlp_hidden_dim=16, base_mlp_depth=1, head_mlp_hidden_dim=16,
                     head_mlp_depth=1, num_message_passing_steps=2, radius=4.0, max_num_neighbors=12)
    model = OrbPotential([1, 7, 8], tiny, ORB_BAYES).double()
    frames = []
    for k in range(6):
        a = molecule("NH3")
        a.rattle(0.02 * (k + 1), seed=k)
        frames.append(a)
    desc = descriptors(model, frames + [frames[0].copy()])
    assert desc.shape == (7, 16) and np.allclose(desc[0], desc[6]) and np.linalg.norm(desc[0] - desc[5]) > 1e-6
    chosen = select(desc, np.linspace(0.1, 1.0, 7), SelectConfig(budget=3, min_distance=1e-9))
    assert len(chosen) == 3 and chosen[0] == 6 and 0 not in chosen  # frame 0 is a duplicate of the first pick


# ------------------------------------------------------------------------------------------- oracles


def test_labelling_on_two_workers_uses_two_processes_and_gives_the_serial_labels(cu_root, monkeypatch):
    frames = read(cu_root / "val.extxyz", ":")[:4]
    config = OracleConfig(kind="ase", calculator="ase.calculators.emt:EMT")
    results, arrived = {}, {}
    for workers in (1, 2):
        got = {}
        if workers == 2:  # each call sleeps 1 s first: calls on two workers must overlap in time
            monkeypatch.setenv("BLIP_LEARN_LABEL_DELAY_S", "1.0")

        def on_label(k, lab, got=got):
            got[k], arrived[k] = lab, time.monotonic()

        label_frames(frames, config, on_label, workers=workers)
        results[workers] = got
    assert sorted(results[2]) == [0, 1, 2, 3]
    pids = {lab.pid for lab in results[2].values()}
    assert len(pids) == 2 and os.getpid() not in pids
    spans = {k: (arrived[k] - lab.seconds, arrived[k], lab.pid) for k, lab in results[2].items()}
    overlap = max(min(a[1], b[1]) - max(a[0], b[0]) for a in spans.values() for b in spans.values() if a[2] != b[2])
    assert overlap > 0.3, spans  # in parallel, not one after the other
    for k, atoms in enumerate(frames):  # the file's labels were computed before rounding positions to 8 digits
        one, two = results[1][k], results[2][k]
        assert np.array_equal(two.forces, one.forces) and two.energy == one.energy
        assert np.allclose(results[2][k].forces, atoms.get_forces(), atol=1e-5)


def test_a_non_finite_label_or_a_failing_calculation_is_a_recorded_failure():
    far = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0]])  # coincident atoms: EMT divides by zero
    label = label_one(far, OracleConfig(kind="ase", calculator="ase.calculators.emt:EMT"))
    assert label.error == "non-finite, missing or misshapen forces"
    uranium = Atoms("U2", positions=[[0, 0, 0], [0, 0, 2.5]])  # EMT has no parameters for U: it raises
    bad = label_one(uranium, OracleConfig(kind="ase", calculator="ase.calculators.emt:EMT"))
    assert bad.error.startswith("NotImplementedError") and bad.energy is None


def test_pyscf_labels_are_in_ev_and_an_unconverged_scf_is_a_recorded_failure():
    pyscf = pytest.importorskip("pyscf", reason="PySCF is the [dft] extra: pip install -e '.[dft]'")
    from ase import units

    water = molecule("H2O")
    config = OracleConfig(kind="pyscf", method="hf", basis="sto-3g")
    label = label_one(water, config)
    mol = pyscf.gto.M(atom=list(zip(water.get_chemical_symbols(), water.positions.tolist())), basis="sto-3g", verbose=0)
    mf = pyscf.scf.RHF(mol)
    assert np.isclose(label.energy, mf.kernel() * units.Hartree)
    assert np.allclose(label.forces, -mf.nuc_grad_method().kernel() * units.Hartree / units.Bohr)
    assert abs(label.forces.sum(0)).max() < 1e-4  # no net force: the gradient is the molecule's
    failed = label_one(water, OracleConfig(kind="pyscf", method="b3lyp", basis="6-31g*", max_cycle=1))
    assert failed.error and "did not converge" in failed.error


def test_a_missing_pyscf_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyscf", None)
    monkeypatch.setitem(sys.modules, "pyscf.dft", None)
    with pytest.raises(ValueError, match=r'pip install "blip-ase\[dft\]"'):
        check_oracle(OracleConfig(kind="pyscf"), [molecule("H2O")])


# ------------------------------------------------------------------------------------------- the loop


def _ids(path: Path) -> list[str]:
    return [a.info["frame_id"] for a in read(path, ":")] if path.stat().st_size else []


def _logged(out: Path) -> list[str]:
    logs = sorted(out.glob("round_*/labels.log"))
    return [json.loads(line)["frame_id"] for p in logs for line in p.read_text().splitlines()]


def test_the_emt_loop_labels_fine_tunes_and_reports_round_after_round(cu_root, capsys):
    out = cu_root / "run_emt"
    assert main(["learn", str(_config(cu_root, stop={"max_rounds": 3, "max_labels": 6})), "--out", str(out)]) == 0
    assert "label budget spent: 6 oracle calls" in capsys.readouterr().out
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "stopped" and state["labels_spent"] == 6 and state["model"].endswith("round_2/model.pt")
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [int(r["round"]) for r in rows] == [1, 2, 3] and [r["n_selected"] for r in rows] == ["4", "2", ""]
    assert int(rows[1]["n_train_total"]) + int(rows[1]["n_val_total"]) == 14 + 6
    assert all(float(r["val_forces_mae"]) > 0 for r in rows[:2]) and int(rows[2]["md_steps_completed"]) == 60
    required = ["round", "n_flagged", "n_selected", "n_labelled", "n_failed", "n_train_total", "md_steps_completed",
                "halted", "val_forces_mae", "val_forces_ece", "seconds_md", "seconds_label", "seconds_train"]
    assert set(required) <= set(rows[0]) and all(rows[0][key] != "" for key in required)
    for k in (1, 2):
        rdir = out / f"round_{k}"
        flagged = {a.info["frame_id"]: a for a in read(rdir / "flagged.extxyz", ":")}
        selected, labelled = read(rdir / "selected.extxyz", ":"), read(rdir / "labelled.extxyz", ":")
        assert int(rows[k - 1]["n_flagged"]) == len(flagged) >= len(selected)
        assert [a.info["frame_id"] for a in labelled] == [a.info["frame_id"] for a in selected]
        for atoms in labelled:  # the oracle's labels, with the provenance of the flagged frame
            assert np.allclose(atoms.get_forces(), _labelled(atoms, EMT()).get_forces())
            assert np.isclose(atoms.get_potential_energy(), _labelled(atoms, EMT()).get_potential_energy())
            assert atoms.info["oracle"] == "ase:ase.calculators.emt:EMT" and atoms.info["round"] == k
            source = flagged[atoms.info["frame_id"]]
            assert np.allclose(atoms.positions, source.positions)
            for key in ("walker", "step", "temperature_K", "uncertainty"):
                assert atoms.info[key] == source.info[key], key
            assert atoms.info["uncertainty"] > 0 and atoms.info["split"] in ("train", "val")
        metrics = json.loads((rdir / "metrics.json").read_text())
        assert metrics["round"] == k and metrics["n_labelled"] == len(labelled) and (rdir / "model.pt").is_file()
    labelled = _ids(out / "round_1/labelled.extxyz") + _ids(out / "round_2/labelled.extxyz")
    assert (out / "report.png").stat().st_size > 0 and sorted(_logged(out)) == sorted(labelled)
    assert [int(r["labels_total"]) for r in rows] == [14 + 4, 14 + 6, 14 + 6]  # starting data included
    summary = json.loads((out / "round_1" / "md" / "summary.json").read_text())  # engine auto: one batch
    assert summary["n_walkers"] == 2 and [w["seed"] for w in summary["walkers"]] == [1000, 1001]
    assert [w["temperature_K"] for w in summary["walkers"]] == [600, 1200]


def test_the_loop_resolves_calibrated_thresholds_against_each_rounds_own_model(cu_root):
    """``blip learn`` recalibrates every round; thresholds in calibrated units follow: round 1
    explores with the start model's resolution, round 2 with the fine-tuned, recalibrated one's."""
    start = cu_root / "model0_calibrated.pt"
    assert main(["calibrate", "--model", str(cu_root / "model0" / "model.pt"), "--data", str(cu_root / "val.extxyz"),
                 "--out", str(start), "--n-samples", "4", "--no-progress"]) == 0  # fmt: skip
    md = {**FAST_MD, "thresholds": {"calibrated_flag": 0.0, "calibrated_halt": 1000.0}}  # every check flagged
    path = _config(cu_root, "calibrated.yaml", model=start.name, explore={"md": md}, stop={"max_rounds": 1},
                   train={"power": True})  # the power-law variance map (blip calibrate --power)
    run_learn(load_learn_config(path), cu_root / "run_calibrated")
    fitted = cu_root / "run_calibrated" / "round_1" / "model.pt"
    assert "forces_power" in torch.load(fitted, weights_only=True)["calibration"]
    assert "forces_power" not in torch.load(start, weights_only=True)["calibration"]
    spec = Thresholds(calibrated_flag=0.0, calibrated_halt=1000.0)
    for k, model in ((1, start), (2, cu_root / "run_calibrated" / "round_1" / "model.pt")):
        summary = json.loads((cu_root / "run_calibrated" / f"round_{k}" / "md" / "summary.json").read_text())
        reference = torch.load(model, weights_only=True)["reference"]
        expected = spec.resolve(reference, ["Cu"])
        assert summary["thresholds"]["per_element"]["Cu"] == pytest.approx(list(expected.per_element["Cu"]))
        assert summary["config"]["thresholds"]["calibrated_halt"] == 1000.0
    halts = [json.loads((cu_root / "run_calibrated" / f"round_{k}" / "md" / "summary.json").read_text())["thresholds"]
             ["per_element"]["Cu"][1] for k in (1, 2)]  # fmt: skip
    assert halts[0] != halts[1]  # the recalibrated model's own quantiles


def test_a_clean_exploration_stops_the_loop_before_any_label(cu_root):
    md = {**FAST_MD, "thresholds": {"force_std_flag": 50.0, "force_std_halt": 100.0}}
    state = run_learn(load_learn_config(_config(cu_root, "clean.yaml", explore={"md": md})), cu_root / "run_clean")
    assert state.stopped.startswith("converged") and state.labels_spent == 0
    assert not (cu_root / "run_clean" / "round_2").exists() and state.rounds[0]["halted"] == 0


def test_the_external_oracle_writes_to_label_waits_and_continues_with_the_files_labels(cu_root, capsys):
    config, out = _config(cu_root, "external.yaml", oracle={"kind": "external"}), cu_root / "run_external"
    assert main(["learn", str(config), "--out", str(out)]) == 0
    assert "waiting for labels" in capsys.readouterr().out
    to_label = read(out / "round_1" / "to_label.extxyz", ":")
    assert len(to_label) == 4 and not (out / "round_1" / "labelled.extxyz").exists()
    done = [_labelled(a, EMT()) for a in to_label]
    done[1].calc.results["forces"][0, 0] = np.nan  # a broken label is recorded and skipped
    del done[2]  # a frame the user did not label
    for a, src in zip(done, [to_label[0], to_label[1], to_label[3]]):
        a.info["frame_id"] = src.info["frame_id"]
    (out / "round_1" / "labelled.extxyz").write_text("3\nnot a header\nCu 0 0\n")  # unreadable: refused, kept
    assert main(["learn", str(config), "--out", str(out), "--restart"]) == 2
    assert re.search(r"cannot read \S*labelled.extxyz as extxyz", capsys.readouterr().err)
    assert not list((out / "round_1" / "labels").iterdir()) and (out / "round_1" / "to_label.extxyz").is_file()
    write(out / "round_1" / "labelled.extxyz", done)
    assert main(["learn", str(config), "--out", str(out), "--restart"]) == 0
    row = json.loads((out / "round_1" / "metrics.json").read_text())
    assert row["n_labelled"] == 2 and row["n_failed"] == 2
    labelled = read(out / "round_1" / "labelled.extxyz", ":")  # the user's labels (as in the file), unchanged
    external = read(out / "round_1" / "labelled.external.extxyz", ":")
    assert [a.info["frame_id"] for a in labelled] == [done[0].info["frame_id"], done[2].info["frame_id"]]
    for atoms, given in zip(labelled, [external[0], external[2]]):
        assert atoms.get_potential_energy() == given.get_potential_energy() and atoms.info["oracle"] == "external"
        assert np.array_equal(atoms.get_forces(), given.get_forces())
    errors = {f["error"] for f in row["failures"]}
    assert errors == {"non-finite, missing or misshapen forces", "missing from labelled.extxyz"}
    assert (out / "round_1" / "labelled.external.extxyz").is_file() and (out / "round_1" / "model.pt").is_file()


def _descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (Linux /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie awaiting its reaper is dead)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL, /proc")
@pytest.mark.parametrize("stage", ["label", "train"])
def test_a_kill_during_labelling_or_training_loses_no_frame_and_labels_none_twice(cu_root, stage):
    """SIGKILL ``blip learn`` while the oracle runs (each call delayed by the test hook) or while
    the model trains; ``--restart`` finishes the loop."""
    out = cu_root / f"run_kill_{stage}"
    epochs = 2 if stage == "label" else 60
    config = _config(cu_root, f"kill_{stage}.yaml", train={"config": {"epochs": epochs}, "calibration_samples": 4},
                     oracle={"workers": 2})  # fmt: skip
    cmd = [sys.executable, "-m", "blip_ase.cli.main", "learn", str(config), "--out", str(out)]
    env = {**os.environ, "BLIP_LEARN_LABEL_DELAY_S": "3.0" if stage == "label" else "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / "round_1" / ("labels.log" if stage == "label" else "train/log.csv")
    deadline = time.monotonic() + 120
    while not (marker.is_file() and marker.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    if stage == "label":  # issue 19 item 4: the labelling workers die with their parent, not after their call
        assert len(workers) >= 2, workers
        deadline = time.monotonic() + 1.5  # each worker's next call still sleeps for about 3 s
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(workers), f"workers {_alive(workers)} survived the SIGKILL of their parent"
    state = json.loads((out / "state.json").read_text())
    assert state["stage"] == stage and state["status"] == "running"
    if stage == "label":
        assert 1 <= len(_logged(out)) < 4
    done = subprocess.run(cmd + ["--restart"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    selected, logged = _ids(out / "round_1" / "selected.extxyz"), _logged(out)
    assert sorted(logged) == sorted(selected) and len(selected) == 4  # each frame labelled exactly once
    assert _ids(out / "round_1" / "labelled.extxyz") == selected
    assert json.loads((out / "state.json").read_text())["stopped"].startswith("max_rounds")


def test_the_pyscf_loop_runs_hf_sto3g_on_water(tmp_path):
    pytest.importorskip("pyscf", reason="PySCF is the [dft] extra: pip install -e '.[dft]'")
    water = molecule("H2O")
    frames = []
    for k in range(10):
        a = water.copy()
        a.rattle(0.03, seed=k)
        frames.append(a)
    config = OracleConfig(kind="pyscf", method="hf", basis="sto-3g")
    frames = [_labelled(a, SinglePointCalculator(a, energy=lab.energy, forces=lab.forces))
              for a, lab in zip(frames, [label_one(a, config) for a in frames])]
    _start_model(tmp_path, frames, water)
    md = {"timestep_fs": 0.5, "uq_interval": 5, "n_samples": 4, "thresholds": {"force_std_flag": 0.0}}
    path = _config(tmp_path, explore={"temperatures_K": [300], "md": md}, select={"budget": 3},
                   oracle={"kind": "pyscf", "method": "hf", "basis": "sto-3g", "workers": 2})
    state = run_learn(load_learn_config(path), tmp_path / "run")
    rdir = tmp_path / "run" / "round_1"
    labelled = read(rdir / "labelled.extxyz", ":")
    assert state.stopped.startswith("max_rounds") and len(labelled) == 3
    assert {a.info["oracle"] for a in labelled} == {"pyscf:hf/sto-3g"}
    assert [a.info["frame_id"] for a in labelled] == _ids(rdir / "selected.extxyz")
    for atoms in labelled:
        again = label_one(atoms, config)
        assert np.isclose(atoms.get_potential_energy(), again.energy)
        assert np.allclose(atoms.get_forces(), again.forces, atol=1e-5)
    assert (rdir / "flagged.extxyz").stat().st_size and (rdir / "model.pt").is_file()
    rows = list(csv.DictReader(open(tmp_path / "run" / "report.csv")))
    assert rows[0]["n_labelled"] == "3" and rows[0]["n_failed"] == "0" and float(rows[0]["val_forces_mae"]) > 0
    assert json.loads((rdir / "metrics.json").read_text())["n_train_total"] == int(rows[0]["n_train_total"])


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case, match",
    [
        ({"oracle": {"calculator": "no_such_module:Calc"}}, "cannot be imported"),
        ({"oracle": {"kind": "pyscf", "method": "nosuchfunctional"}}, "does not know the method"),
        ({"oracle": {"kind": "pyscf", "basis": "nosuchbasis"}}, "rejects basis"),
        ({"select": {"budget": 0}}, "select.budget must be an integer >= 1"),
        ({"explore": {"structures": ["h2o.xyz"]}}, r"elements \['H', 'O'\] the model"),
        ({"explore": {"md": {"temperature_K": 5}}}, "explore.md may not set"),
        ({"explore": {"structures": ["missing.xyz"]}}, r"structure file \S*missing.xyz does not exist"),
        ({"explore": {"temperatures_K": [float("nan")]}}, r"explore.temperatures_K\[0\] must be a finite number, got nan"),
        ({"explore": {"temperatures_K": [-300]}}, "explore.temperatures_K must list finite temperatures"),
        ({"explore": {"md": {**FAST_MD, "timestep_fs": -1.0}}}, "explore.md: timestep_fs must be > 0"),
        ({"select": {"min_distance": float("inf")}}, "select.min_distance must be a finite number, got inf"),
        ({"select": {"min_distance": -0.5}}, "select.min_distance must be a finite number >= 0, got -0.5"),
        ({"train": {"val_fraction": "a"}}, "train.val_fraction must be a finite number, got 'a'"),
        ({"train": {"val_fraction": 1.0}}, r"train.val_fraction must be a number in \[0, 1\), got 1.0"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"train": {"config": {"epochz": 3}}}, r"unknown key\(s\) \['epochz'\] in train.config"),
        ({"val_data": "h2o.xyz"}, r"val_data \S*h2o.xyz frame 0 has no energy label"),
        ({"explore": {"engine": "walkers", "md": {**FAST_MD, "ensemble": "nvt-nose-hoover",
                      "thresholds": {"force_std_flag": 0.0}}}}, "explore.engine walkers: .*cannot run nvt-nose-hoover"),
        ({"explore": {"engine": "gpu"}}, r"explore.engine must be one of \['auto', 'walkers', 'serial'\]"),
        ({"oracle": {"executor": "slurm"}}, r"oracle.executor must be one of \['processes', 'dask'\]"),
        ({"oracle": {"dask_address": "tcp://x:8786"}}, "oracle.dask_address needs executor: dask"),
        ({"stop": {"max_rounds": 0}}, "stop.max_rounds must be an integer >= 1"),
        ({"explore": {"md": FAST_MD}}, r"model0/model.pt has no calibration reference.*blip calibrate"),
        ({"explore": {"md": {**FAST_MD, "thresholds": {"calibrated_flag": 1.0, "force_std_flag": 0.1}}}},
         "flag force-std threshold is given twice"),
        ({"train": {"power": "yes"}}, "train.power must be true or false"),
        ({"train": {"calibrate": False}, "explore": {"md": {**FAST_MD, "thresholds": {"calibrated_flag": 1.0}}}},
         "calibrated units .* but train.calibrate is false"),
    ],
)
def test_bad_input_is_refused_before_any_work(cu_root, capsys, case, match):
    if case.get("oracle", {}).get("kind") == "pyscf":
        pytest.importorskip("pyscf", reason="PySCF is the [dft] extra: pip install -e '.[dft]'")
        case["explore"] = {"structures": ["h2o.xyz"]}  # PySCF checks method and basis on the molecules
    write(cu_root / "h2o.xyz", molecule("H2O"))
    out = cu_root / "run_bad"
    assert main(["learn", str(_config(cu_root, "bad.yaml", **case)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blip learn: error:") and re.search(match, err), err
    assert not out.exists()


def test_a_config_built_in_python_is_checked_like_one_read_from_yaml():
    """The sections check their own ranges (the YAML loader checks the types first)."""
    from blip_ase.active.config import ExploreConfig, FineTuneConfig, StopConfig

    md = {"thresholds": {"force_std_flag": 0.1}}
    with pytest.raises(ValueError, match="explore.temperatures_K must list finite temperatures >= 0 K, got nan"):
        ExploreConfig(structures=("a.xyz",), temperatures_K=(float("nan"),), md=md)
    with pytest.raises(ValueError, match="explore.structures must list at least one entry"):
        ExploreConfig(md=md)
    with pytest.raises(ValueError, match="explore.md.thresholds needs a flag threshold"):
        ExploreConfig(structures=("a.xyz",), md={"thresholds": {"force_std_halt": 1.0}})
    with pytest.raises(ValueError, match=r"train.val_fraction must be a number in \[0, 1\), got 'a'"):
        FineTuneConfig(val_fraction="a")
    with pytest.raises(ValueError, match="stop.max_labels must be an integer >= 1, got True"):
        StopConfig(max_labels=True)
    with pytest.raises(ValueError, match="oracle.workers must be an integer >= 1, got 0"):
        OracleConfig(workers=0)
    assert ExploreConfig(structures=["a.xyz"], temperatures_K=[300], md=md).walkers == [("a.xyz", 300)]


def test_a_missing_or_malformed_config_file_is_a_one_line_error(cu_root, capsys):
    out = cu_root / "run_bad_yaml"
    assert main(["learn", str(cu_root / "no_such.yaml"), "--out", str(out)]) == 2
    assert re.fullmatch(r"blip learn: error: config file \S*no_such.yaml does not exist\n", capsys.readouterr().err)
    (cu_root / "malformed.yaml").write_text("model: [unclosed\n  x: {\n")
    assert main(["learn", str(cu_root / "malformed.yaml"), "--out", str(out)]) == 2
    assert re.fullmatch(r"blip learn: error: \S*malformed.yaml is not valid YAML: [^\n]*line 2[^\n]*\n",
                        capsys.readouterr().err)
    assert not out.exists()


def test_an_existing_out_without_restart_is_refused_and_left_untouched(cu_root, capsys):
    out = cu_root / "run_existing"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert main(["learn", str(_config(cu_root)), "--out", str(out)]) == 2
    assert "already exists; pass --restart" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_a_restart_with_more_rounds_continues_a_loop_that_stopped_at_max_rounds(cu_root):
    config, out = load_learn_config(_config(cu_root, "more.yaml")), cu_root / "run_more"
    assert run_learn(config, out).stopped.startswith("max_rounds: 1")
    first = (out / "round_1" / "labelled.extxyz").read_bytes()
    state = run_learn(config, out, restart=True, max_rounds=2)
    assert state.stopped.startswith("max_rounds: 2") and [r["round"] for r in state.rounds] == [1, 2, 3]
    assert (out / "round_2" / "model.pt").is_file() and (out / "round_1" / "labelled.extxyz").read_bytes() == first
    with pytest.raises(ValueError, match=r"changes \['select.budget'\]"):
        run_learn(load_learn_config(_config(cu_root, "more.yaml", select={"budget": 2})), out, restart=True)


@pytest.mark.parametrize("engine, signum", [("serial", signal.SIGINT), ("walkers", signal.SIGTERM)])
def test_ctrl_c_during_the_exploration_stops_the_loop_and_restart_reruns_the_walker(cu_root, engine, signum):
    """An interrupted walker is not a halt: the loop must not go on to select from a cut-short run.
    state.json says ``interrupted``, and the printed command resumes it."""
    out = cu_root / f"run_sigint_{engine}"
    config = _config(cu_root, f"sigint_{engine}.yaml", explore={"steps": 300, "engine": engine})
    cmd = [sys.executable, "-m", "blip_ase.cli.main", "learn", str(config), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    md = out / "round_1" / "md" / ("walker_0" if engine == "serial" else "")
    marker = md / "uncertainty.csv"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if marker.is_file() and len(marker.read_text().splitlines()) > 2:  # the header, then checks
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum and f"continue with: blip learn --out {out} --restart" in stdout, stderr
    state = json.loads((out / "state.json").read_text())
    assert state["stage"] == "explore" and not (out / "round_1" / "flagged.extxyz").exists()
    assert state["status"] == "interrupted" and state["signal"] == signal.Signals(signum).name
    assert json.loads((md / "summary.json").read_text())["status"] == "interrupted"
    resume = stdout.split("continue with: ")[1].split()
    assert resume[:2] == ["blip", "learn"]
    done = subprocess.run([sys.executable, "-m", "blip_ase.cli.main", *resume[1:]], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert rows[0]["md_steps_completed"] == "600" and rows[0]["n_labelled"] == "4"
    assert (out / "round_1" / "md" / ("walker_1" if engine == "serial" else "flagged.extxyz")).exists()


def test_the_example_config_passes_every_check_with_its_shipped_starting_model(tmp_path):
    pytest.importorskip("pyscf", reason="the example's oracle is PySCF: pip install -e '.[dft]'")
    from blip_ase.active.loop import check_inputs

    example = Path(__file__).resolve().parents[1] / "examples" / "active_learning" / "learn.yaml"
    config = load_learn_config(example)
    assert config.oracle.name == "pyscf:b3lyp/6-31g*" and Path(config.test_data).is_file()
    assert check_inputs(config, tmp_path / "al_run", restart=False) is None and not (tmp_path / "al_run").exists()


# ------------------------------------------------------------------------------------------- issue 19


def test_a_restart_keeps_the_command_line_limits_of_the_run_and_changes_them_only_explicitly(cu_root, capsys):
    """Issue 19 item 3: ``--restart`` went back to the YAML's max_rounds and ignored ``--max-rounds``
    of the first run. The stored settings rule; a change needs a flag and is recorded."""
    config, out = _config(cu_root, "limits.yaml", stop={"max_rounds": 3}), cu_root / "run_limits"
    assert main(["learn", str(config), "--out", str(out), "--max-rounds", "1", "--max-labels", "40"]) == 0
    assert "max_rounds: 1 rounds" in capsys.readouterr().out
    for argv in (["learn", str(config), "--out", str(out), "--restart"], ["learn", "--out", str(out), "--restart"]):
        assert main(argv) == 0  # the YAML says 3 rounds, the run said 1: the run's limit holds
        state = json.loads((out / "state.json").read_text())
        assert state["labels_spent"] == 4 and state["stopped"].startswith("max_rounds: 1") and not state["changes"]
        assert state["overrides"] == {"stop.max_rounds": 1, "stop.max_labels": 40}
        assert state["config"]["stop"]["max_rounds"] == 1 and state["config"]["stop"]["max_labels"] == 40
    assert not (out / "round_2" / "selected.extxyz").exists()
    edited = _config(cu_root, "limits.yaml", stop={"max_rounds": 3, "max_flagged_fraction": 0.6})
    assert main(["learn", str(edited), "--out", str(out), "--restart"]) == 2
    err = capsys.readouterr().err
    assert "changes stop.max_flagged_fraction 0.5 -> 0.6" in err and "--accept-changes" in err
    argv = ["learn", str(edited), "--out", str(out), "--restart", "--accept-changes", "--max-rounds", "3"]
    assert main(argv + ["--max-labels", "5"]) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["labels_spent"] == 5 and state["stopped"] == "label budget spent: 5 oracle calls"
    assert state["config"]["stop"] == {"max_rounds": 3, "max_labels": 5, "max_flagged_fraction": 0.6}
    assert [c["changed"] for c in state["changes"]] == [
        {"stop.max_flagged_fraction": [0.5, 0.6], "stop.max_labels": [40, 5], "stop.max_rounds": [1, 3]}
    ]
    assert state["changes"][0]["round"] == 2 and state["changes"][0]["stage"] == "explore"


def test_labels_total_and_report_png_count_the_starting_data_and_tick_whole_rounds(cu_root, monkeypatch):
    """Issue 19 item 7: the cumulative count left out the 14 starting frames; ticks were 1.5, 2.5."""
    import matplotlib.figure

    from blip_ase.active.report import labels_total, plot_report

    rows = [{"round": 1, "n_labelled": 4, "n_failed": 0, "md_steps_completed": 5, "md_steps_requested": 6},
            {"round": 2, "n_labelled": 1, "n_failed": 1, "md_steps_completed": 6, "md_steps_requested": 6},
            {"round": 3, "md_steps_completed": 6, "md_steps_requested": 6, "val_forces_mae": 0.1}]  # fmt: skip
    assert labels_total(rows, 14) == [18, 20, 20]
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    plot_report(cu_root, rows, n_start=14)
    ticks = np.concatenate([ax.get_xticks() for ax in saved[0].axes])
    assert np.array_equal(ticks, np.round(ticks))
    assert list(saved[0].axes[1].lines[0].get_ydata()) == [18, 20, 20]


COUNTING = """
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT


class CountingEMT(EMT):
    built = 0

    def __init__(self, **kwargs):
        type(self).built += 1
        super().__init__(**kwargs)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results["energy"] = float(type(self).built)  # how many were built in this process
"""


def test_the_ase_oracle_builds_one_calculator_per_worker(cu_root, tmp_path, monkeypatch):
    """Issue 19 item 2: the ase oracle built one calculator per frame."""
    (tmp_path / "counting_calc.py").write_text(COUNTING)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    frames = read(cu_root / "val.extxyz", ":")[:6]
    config = OracleConfig(kind="ase", calculator="counting_calc:CountingEMT")
    got = {}
    label_frames(frames, config, lambda k, lab: got.__setitem__(k, lab), workers=2)
    assert sorted(got) == list(range(6)) and all(lab.error is None for lab in got.values())
    assert {lab.energy for lab in got.values()} == {1.0} and len({lab.pid for lab in got.values()}) <= 2
    for k, atoms in enumerate(frames):  # and a reused calculator gives each frame its own forces
        assert np.allclose(got[k].forces, atoms.get_forces(), atol=1e-5)


def test_dask_labels_equal_local_ones_and_a_failure_is_recorded(cu_root):
    """Issue 19 item 5: the oracle on a Dask cluster (here a LocalCluster of 2 workers)."""
    pytest.importorskip("distributed", reason="the [cluster] extra: pip install -e '.[cluster]'")
    from distributed import LocalCluster

    frames = read(cu_root / "val.extxyz", ":")[:3] + [Atoms("U2", positions=[[0, 0, 0], [0, 0, 2.5]])]
    local, remote = {}, {}
    config = OracleConfig(kind="ase", calculator="ase.calculators.emt:EMT")
    label_frames(frames, config, lambda k, lab: local.__setitem__(k, lab), workers=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask = OracleConfig(kind="ase", calculator="ase.calculators.emt:EMT", executor="dask",
                            dask_address=cluster.scheduler_address)  # a running cluster, reached by its address
        label_frames(frames, dask, lambda k, lab: remote.__setitem__(k, lab))
        worker_pids = {w.pid for w in cluster.workers.values()}
    assert sorted(remote) == [0, 1, 2, 3] and {lab.pid for lab in remote.values()} <= worker_pids
    for k in range(3):
        assert remote[k].energy == local[k].energy and np.array_equal(remote[k].forces, local[k].forces)
    assert remote[3].error.startswith("NotImplementedError") and remote[3].energy is None


def test_the_loop_labels_on_dask_and_writes_each_label_file(cu_root):
    pytest.importorskip("distributed", reason="the [cluster] extra: pip install -e '.[cluster]'")
    out = cu_root / "run_dask"
    config = _config(cu_root, "dask.yaml", oracle={"executor": "dask", "workers": 2}, explore={"engine": "serial"})
    state = run_learn(load_learn_config(config), out)
    assert state.stopped.startswith("max_rounds") and state.labels_spent == 4
    rdir = out / "round_1"
    assert sorted(p.name for p in (rdir / "labels").iterdir()) == sorted(f"{i}.extxyz" for i in _ids(rdir / "selected.extxyz"))
    log = [json.loads(line) for line in (rdir / "labels.log").read_text().splitlines()]
    assert len(log) == 4 and os.getpid() not in {entry["pid"] for entry in log}
    for atoms in read(rdir / "labelled.extxyz", ":"):
        assert np.allclose(atoms.get_forces(), _labelled(atoms, EMT()).get_forces())
    assert (out / "round_1" / "md" / "walker_1" / "summary.json").is_file()  # engine serial: one run per walker


def test_explore_engine_auto_batches_two_walkers_or_more_when_the_ensemble_allows(cu_root):
    """Issue 19 item 2: explore.engine auto runs a round's walkers as one torch-sim batch (the EMT
    loop test checks the batch's files)."""
    from blip_ase.active.exploration import uses_walkers

    config = load_learn_config(_config(cu_root, "engine.yaml"))
    assert uses_walkers(config)  # nvt-langevin, two walkers
    single = load_learn_config(_config(cu_root, "engine1.yaml", explore={"temperatures_K": [600]}))
    assert not uses_walkers(single)


def test_make_start_has_help_and_writes_only_to_its_output_directory(tmp_path):
    """Issue 19 item 7: --help ran the whole job and the script overwrote tracked files."""
    script = Path(__file__).resolve().parents[1] / "examples" / "active_learning" / "make_start.py"
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--out" in done.stdout and time.monotonic() - start < 30
    bare = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bare.returncode == 2 and "--out" in bare.stderr and not any(tmp_path.iterdir())
    shipped = script.parent / "start"
    refused = subprocess.run([sys.executable, str(script), "--out", str(shipped)], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "already exists" in refused.stderr
