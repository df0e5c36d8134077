"""The ``blip`` commands under misuse: outputs never mixed, progress shown, threads applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ase.io import read, write

from blip_ase.assets import ammonia_model
from blip_ase.cli.compute import DEFAULT_TORCH_THREADS
from blip_ase.cli.main import main as blip

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ammonia"


@pytest.fixture(scope="module")
def val5(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "val5.extxyz"
    write(path, read(EXAMPLE / "val.extxyz", ":5"), format="extxyz")
    return path


def run_blip(*args) -> int:
    return blip([str(a) for a in args])


def test_blip_eval_refuses_an_existing_out_unless_overwrite_and_then_leaves_no_old_plot(val5, tmp_path, capsys):
    """Before: a second ``blip eval --out`` silently mixed new metrics with the old run's plots."""
    out = tmp_path / "eval"
    common = ("eval", "--model", ammonia_model(), "--data", val5, "--n-samples", 4, "--out", out, "--no-progress")
    assert run_blip(*common) == 0
    assert (out / "calibration_curve.png").is_file()
    first = (out / "metrics.json").read_text()
    capsys.readouterr()
    assert run_blip(*common, "--seed", 1) == 2
    assert f"output directory {out} already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == first
    assert run_blip(*common, "--seed", 1, "--overwrite", "--no-plots") == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_eval_and_calibrate_show_a_progress_bar_unless_asked_not_to(val5, tmp_path, capsys, command):
    out = tmp_path / ("o" if command == "eval" else "o.pt")
    common = (command, "--model", ammonia_model(), "--data", val5, "--n-samples", 4, "--out", out)
    assert run_blip(*common) == 0
    err = capsys.readouterr().err
    assert "predict" in err and "5/5" in err and "structure" in err
    assert run_blip(*common, "--overwrite", "--no-progress") == 0
    assert "5/5" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "calibrate", "md"])
def test_every_command_takes_torch_threads_with_the_measured_default(command, capsys):
    with pytest.raises(SystemExit):
        blip([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--torch-threads TORCH_THREADS CPU threads of torch" in text
    assert f"(default: {DEFAULT_TORCH_THREADS})" in text and DEFAULT_TORCH_THREADS == 1


def test_torch_threads_is_applied_before_the_command_runs(val5, tmp_path):
    previous = torch.get_num_threads()
    try:
        args = ("eval", "--model", ammonia_model(), "--data", val5, "--n-samples", 2, "--no-progress")
        assert run_blip(*args, "--out", tmp_path / "a", "--torch-threads", 2, "--no-plots") == 0
        assert torch.get_num_threads() == 2
        assert run_blip(*args, "--out", tmp_path / "b", "--torch-threads", 0) == 2
    finally:
        torch.set_num_threads(previous)
