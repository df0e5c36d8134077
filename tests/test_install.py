"""The main job from a non-editable install: build a wheel, install it in a fresh virtual
environment and run ``blip md`` from an empty directory.

Before: the default model and structure were found through the repository layout
(``REPO_ROOT = parents[2]``), so ``pip install .`` followed by ``blip md`` elsewhere failed. The
new environment sees the already installed dependencies through a ``.pth`` file of plain paths
(so the test costs seconds, not a download of torch; an editable install there stays inactive);
the package itself comes only from the wheel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_blip_md_runs_from_an_installed_wheel_in_an_empty_directory(tmp_path):
    dist, env_dir, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # nothing leaks in
    env["OMP_NUM_THREADS"] = "1"
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]  # offline if we can
    run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", *isolation, "-w", dist, "-q"], env=env)
    (wheel,) = dist.glob("blip_ase-*.whl")
    base = getattr(sys, "_base_executable", sys.executable)  # a venv made from a venv's python misbehaves
    run([base, "-m", "venv", "--without-pip", env_dir])
    python = env_dir / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], env=env)
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip()
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")  # plain paths only
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    site = run([python, "-c", "import blip_ase; print(blip_ase.__file__)"], cwd=work, env=env).stdout.strip()
    assert Path(site).is_relative_to(env_dir), f"blip_ase imported from {site}, not from the wheel"
    run([env_dir / "bin" / "blip", "md", "--steps", "20", "--no-progress", "--no-plot"], cwd=work, env=env)
    summary = json.loads((work / "md_out" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 20
    assert Path(summary["model"]).is_relative_to(env_dir) and summary["model"].endswith("ammonia_model.pt")
    assert sysconfig.get_paths()["purelib"] not in summary["model"]
