"""MD thresholds in calibrated units: multiples of the per-element force-error quantiles that
``blip calibrate`` stores in the checkpoint (``reference``), resolved to eV/A once per model.

The end-to-end tests use the shipped ammonia model, which is calibrated and has a reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_checkpoint

from blip_ase.cli.main import main as blip
from blip_ase.md import DEFAULT_THRESHOLDS, MDConfig, Thresholds, run_md

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "blip_ase" / "assets" / "ammonia_model.pt"
NH3 = ROOT / "blip_ase" / "assets" / "ammonia_nh3.xyz"

REFERENCE = {  # what blip calibrate stores: quantiles of |F_true - F_pred| per element and over all atoms
    "data": "val.extxyz",
    "quantiles": [0.5, 0.9, 0.95, 0.99, 1.0],
    "force_error": {
        "all": [0.02, 0.07, 0.1, 0.2, 0.25],
        "H": [0.02, 0.05, 0.09, 0.1, 0.19],
        "N": [0.04, 0.08, 0.11, 0.3, 0.3],
    },
    "force_std": {"all": [0.04, 0.07, 0.08, 0.09, 0.09]},
    "n_atoms": {"all": 68, "H": 51, "N": 17},
}


def shipped_reference() -> dict:
    return torch.load(SHIPPED_MODEL, weights_only=True)["reference"]


# --- resolution --------------------------------------------------------------------------------


def test_calibrated_thresholds_resolve_per_element_to_multiples_of_the_stored_quantile():
    resolved = Thresholds(calibrated_flag=1.5, calibrated_halt=4.0).resolve(REFERENCE, ["H", "N"])
    assert not resolved.calibrated
    assert resolved.per_element["H"] == pytest.approx((1.5 * 0.1, 4.0 * 0.1))
    assert resolved.per_element["N"] == pytest.approx((1.5 * 0.3, 4.0 * 0.3))
    assert (resolved.force_std_flag, resolved.force_std_halt) == pytest.approx((1.5 * 0.2, 4.0 * 0.2))  # all atoms
    flag, halt = resolved.atom_thresholds(["N", "H", "H", "H"])
    assert flag == pytest.approx([0.45, 0.15, 0.15, 0.15]) and halt == pytest.approx([1.2, 0.4, 0.4, 0.4])


def test_the_quantile_level_picks_its_column_and_an_element_the_calibration_lacked_uses_all_atoms():
    resolved = Thresholds(calibrated_flag=2.0, calibrated_quantile=0.9).resolve(REFERENCE, ["H", "C"])
    assert resolved.per_element["H"] == pytest.approx((0.1, None))
    assert resolved.per_element["C"] == pytest.approx((0.14, None))


def test_absolute_per_element_and_other_level_thresholds_are_kept_as_given():
    spec = Thresholds(calibrated_flag=1.0, force_std_halt=2.0, relative_flag=0.3, per_element={"N": (0.5, 0.9)})
    resolved = spec.resolve(REFERENCE, ["H", "N"])
    assert resolved.per_element["H"] == pytest.approx((0.1, 2.0))
    assert resolved.per_element["N"] == (0.5, 0.9)  # an explicit element threshold wins
    assert resolved.relative_flag == 0.3 and resolved.force_std_halt == 2.0


def test_absolute_thresholds_resolve_to_themselves_without_a_reference():
    spec = Thresholds(force_std_flag=0.25, force_std_halt=1.0)
    assert spec.resolve(None, ["H", "N"]) is spec


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"force_std_flag": 0.2, "calibrated_flag": 1.0}, r"flag force-std threshold is given twice.*give one of them"),
        ({"force_std_halt": 1.0, "calibrated_halt": 4.0}, r"halt force-std threshold is given twice"),
        ({"calibrated_flag": 5.0, "calibrated_halt": 4.0}, "calibrated force std: flag threshold 5 is above the halt"),
        ({"calibrated_flag": -1.0}, "calibrated force std flag threshold must be a finite number >= 0"),
        (
            {"calibrated_flag": 1.0, "calibrated_quantile": 1.5},
            r"calibrated_quantile must be a quantile level in \(0, 1\]",
        ),
    ],
)
def test_contradicting_or_bad_calibrated_thresholds_are_refused_with_a_message(spec, match):
    with pytest.raises(ValueError, match=match):
        Thresholds(**spec)


def test_resolution_refuses_a_model_without_reference_an_unknown_level_and_a_flag_above_the_halt():
    with pytest.raises(ValueError, match=r"m\.pt has no calibration reference.*blip calibrate --model m\.pt.*eV/A"):
        DEFAULT_THRESHOLDS.resolve(None, ["H"], source="m.pt")
    with pytest.raises(ValueError, match="calibrated_quantile 0.98 is not one of the quantile levels .* 0.5, 0.9"):
        Thresholds(calibrated_flag=1.0, calibrated_quantile=0.98).resolve(REFERENCE, ["H"], source="m.pt")
    with pytest.raises(ValueError, match=r"resolved on m\.pt \(calibrated_flag 5\).*flag threshold 1\.5 is above"):
        Thresholds(calibrated_flag=5.0, force_std_halt=1.0).resolve(REFERENCE, ["N"], source="m.pt")


def test_calibrated_thresholds_round_trip_through_the_md_config():
    config = MDConfig(thresholds=Thresholds(calibrated_flag=1.2, calibrated_halt=4.5, calibrated_quantile=0.95))
    assert MDConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_default_on_the_shipped_model_gives_hydrogen_the_old_absolute_default():
    """0.25 / 1.0 eV/A were the measured defaults of the shipped model, set by its H atoms (which
    carry most flags); 1.4 / 5.6 x q99 reproduce them for H and are looser for N, whose force
    errors on the calibration data are larger."""
    resolved = DEFAULT_THRESHOLDS.resolve(shipped_reference(), ["H", "N"])
    assert resolved.per_element["H"] == pytest.approx((0.25, 1.0), abs=0.01)
    assert resolved.per_element["N"] == pytest.approx((0.31, 1.24), abs=0.01)


# --- runs --------------------------------------------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = blip(["md", *args, "--no-progress", "--no-plot"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


HOT = ("--temperature-K", "2500", "--steps", "300", "--uq-interval", "5", "--n-samples", "8", "--no-physical-checks")


def test_blip_md_with_calibrated_thresholds_halts_where_the_equivalent_absolute_ones_do(tmp_path, capsys):
    """Same seed, same model: the calibrated multiples and the eV/A values they resolve to give the
    same flags, the same halt step and the same reason."""
    flag_k, halt_k = 1.5, 2.6  # halt: H 0.46, N 0.58 eV/A (0.55 over all atoms)
    code, text = run_cli(capsys, *HOT, "--out", str(tmp_path / "cal"), "--flag-calibrated", str(flag_k),
                         "--halt-calibrated", str(halt_k))  # fmt: skip
    assert code == 0, text
    cal = json.loads((tmp_path / "cal" / "summary.json").read_text())
    q99 = {k: v[3] for k, v in shipped_reference()["force_error"].items()}
    absolute = [f"--flag-force-std-eV-per-A={flag_k * q99['all']!r}"]
    absolute += [f"--halt-force-std-eV-per-A={halt_k * q99['all']!r}"]
    for symbol in ("H", "N"):
        absolute += ["--element-threshold", f"{symbol}={flag_k * q99[symbol]!r},{halt_k * q99[symbol]!r}"]
    code, text = run_cli(capsys, *HOT, "--out", str(tmp_path / "abs"), *absolute)
    assert code == 0, text
    ab = json.loads((tmp_path / "abs" / "summary.json").read_text())
    assert cal["status"] == ab["status"] == "halted" and 0 < cal["halt_step"] == ab["halt_step"]
    assert cal["stop_reason"] == ab["stop_reason"] and cal["n_flagged"] == ab["n_flagged"] > 0
    for symbol in ("H", "N"):
        assert cal["thresholds"]["per_element"][symbol] == pytest.approx(ab["thresholds"]["per_element"][symbol])
    value, limit, symbol = _halt(cal["stop_reason"])  # the halting atom met its own element's threshold
    assert value > limit and limit == pytest.approx(halt_k * q99[symbol], rel=1e-5)
    assert cal["config"]["thresholds"]["calibrated_halt"] == halt_k  # the spec, what a restart resolves again
    assert cal["config"]["thresholds"]["per_element"] == {} and cal["thresholds"]["calibrated_halt"] is None


def test_blip_md_runs_on_calibrated_thresholds_by_default_and_an_absolute_option_replaces_its_level(tmp_path, capsys):
    code, text = run_cli(capsys, "--steps", "0", "--out", str(tmp_path / "a"))
    assert code == 0, text
    spec = json.loads((tmp_path / "a" / "summary.json").read_text())["config"]["thresholds"]
    assert (spec["calibrated_flag"], spec["calibrated_halt"], spec["force_std_flag"]) == (1.4, 5.6, None)
    code, text = run_cli(capsys, "--steps", "0", "--out", str(tmp_path / "b"), "--halt-force-std-eV-per-A", "none")
    assert code == 0, text
    spec = json.loads((tmp_path / "b" / "summary.json").read_text())["config"]["thresholds"]
    assert (spec["calibrated_flag"], spec["calibrated_halt"], spec["force_std_halt"]) == (1.4, None, None)
    code, text = run_cli(capsys, "--steps", "0", "--out", str(tmp_path / "c"), "--flag-force-std-eV-per-A", "0.3",
                         "--flag-calibrated", "1.1")  # fmt: skip
    assert code == 2 and "flag force-std threshold is given twice" in text and not (tmp_path / "c").exists()


def test_a_model_without_reference_is_refused_before_anything_is_written(tmp_path, capsys):
    model = save_tiny_checkpoint(tmp_path / "tiny.pt", reference=None)
    out = tmp_path / "o"
    code, text = run_cli(capsys, "--model", str(model), "--structure", str(NH3), "--out", str(out))
    assert code == 2 and f"{model} has no calibration reference" in text and "blip calibrate" in text
    assert not out.exists()
    code, text = run_cli(capsys, "--model", str(model), "--structure", str(NH3), "--out", str(out), "--steps", "0",
                         "--flag-force-std-eV-per-A", "0.25", "--halt-force-std-eV-per-A", "1.0")  # fmt: skip
    assert code == 0, text


def test_the_monitor_resolves_calibrated_thresholds_against_its_calculator(tmp_path):
    from ase.io import read

    from blip_ase.calculator import BLIPCalculator
    from blip_ase.md import UncertaintyMonitor, make_dynamics

    atoms = read(NH3)
    atoms.calc = BLIPCalculator.from_checkpoint(SHIPPED_MODEL, mode="map", n_samples=4, device="cpu")
    dyn = make_dynamics(atoms, "nve", timestep_fs=0.5)
    monitor = UncertaintyMonitor(dyn, thresholds=DEFAULT_THRESHOLDS)
    assert monitor.thresholds == DEFAULT_THRESHOLDS.resolve(shipped_reference(), ["H", "N"])
    assert monitor.tracker.thresholds is monitor.thresholds
    atoms.calc = BLIPCalculator.from_checkpoint(
        save_tiny_checkpoint(tmp_path / "t.pt", reference=None), mode="map", device="cpu"
    )
    with pytest.raises(ValueError, match="has no calibration reference"):
        UncertaintyMonitor(dyn, thresholds=DEFAULT_THRESHOLDS)


def test_a_restart_resolves_the_stored_calibrated_thresholds_again(tmp_path, capsys):
    out = tmp_path / "run"
    code, text = run_cli(capsys, "--steps", "10", "--out", str(out), "--flag-calibrated", "0.5")
    assert code == 0, text
    first = json.loads((out / "summary.json").read_text())
    assert blip(["md", "--restart", "--out", str(out), "--steps", "20", "--no-progress", "--no-plot"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["config"]["thresholds"] == first["config"]["thresholds"]
    assert again["thresholds"] == first["thresholds"] and again["final_step"] == 20
    code, text = run_cli(capsys, "--restart", "--out", str(out), "--steps", "30", "--flag-calibrated", "0.6")
    assert code == 2 and "contradict" in text


def test_walkers_apply_the_resolved_thresholds(tmp_path, capsys):
    pytest.importorskip("torch_sim")
    out = tmp_path / "w"
    code, text = run_cli(capsys, *HOT, "--out", str(out), "--walkers", "2", "--halt-calibrated", "3.0",
                         "--flag-calibrated", "1.5", "--ensemble", "nve", "--steps", "100",
                         "--uq-max-interval", "5")  # fmt: skip
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    expected = Thresholds(calibrated_flag=1.5, calibrated_halt=3.0).resolve(shipped_reference(), ["H", "N"])
    assert summary["thresholds"] == json.loads(json.dumps(expected.to_dict()))
    assert summary["config"]["thresholds"]["calibrated_halt"] == 3.0
    halted = [w for w in summary["walkers"] if w["stop_check"] == "force_std"]
    assert halted  # measured: walker 0 halts at step 25 (an H atom above 0.53 eV/A)
    for walker in halted:  # every halt names an atom above its own element's resolved value
        value, limit, symbol = _halt(walker["stop_reason"])
        assert value > limit and np.isclose(limit, expected.per_element[symbol][1], rtol=1e-5)


def _halt(reason: str) -> tuple[float, float, str]:
    """``"step 35: halt: max_force_std 1.2 > 0.9 (atom 1 H)"`` -> ``(1.2, 0.9, "H")``."""
    text = reason.split("max_force_std ", 1)[1]
    value, rest = text.split(" > ", 1)
    limit, atom = rest.split(" (atom ", 1)
    return float(value), float(limit), atom.split()[1].rstrip(")")


def test_run_md_in_python_refuses_calibrated_thresholds_on_a_model_without_reference(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny.pt", reference=None)
    config = MDConfig(model=str(model), structure=str(NH3), out=str(tmp_path / "o"), thresholds=DEFAULT_THRESHOLDS)
    with pytest.raises(ValueError, match="has no calibration reference"):
        run_md(config)
    assert not (tmp_path / "o").exists()
