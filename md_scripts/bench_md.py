#!/usr/bin/env python
"""Cost of uncertainty monitoring per MD step: MAP propagation + MC every k steps vs plain MAP MD.

Runs the same seeded Langevin trajectory twice per repeat, once with plain MAP forces and once
with an :class:`~blip_ase.md.UncertaintyMonitor` (``--n-samples`` Monte Carlo samples every
``--uq-interval`` steps, writers and history included), alternating the two so that both see the
same machine load. Prints one JSON object; ``ratio`` = monitored / plain CPU time per step of this
process (best of ``--repeats``; CPU time, because wall time on a shared machine measures the other
jobs too; ``ratio_wall`` is the wall-clock ratio), to be compared with ``limit`` (2.6 for S=16
every 10 steps)::

    python md_scripts/bench_md.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from blip_ase.assets import ammonia_model, ammonia_structure
from blip_ase.calculator import BLIPCalculator
from blip_ase.md import (
    DEFAULT_THRESHOLDS,
    MDConfig,
    ExtXYZFrameWriter,
    HDF5FrameWriter,
    Thresholds,
    UncertaintyMonitor,
    make_dynamics,
    thermalize,
)
from blip_ase.md.run import read_structure

LIMIT = 2.6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ammonia_model()), help="BLIP checkpoint")
    parser.add_argument("--structure", default=str(ammonia_structure()), help="starting structure")
    parser.add_argument("--steps", type=int, default=1000, help="MD steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each kind (best is used)")
    parser.add_argument("--n-samples", type=int, default=16, help="Monte Carlo samples per check")
    parser.add_argument("--uq-interval", type=int, default=10, help="steps between checks")
    parser.add_argument("--uq-max-interval", type=int, default=None, help="adaptive checks up to this gap (MDConfig)")
    parser.add_argument("--uq-quiet-ratio", type=float, default=MDConfig.uq_quiet_ratio, help="see MDConfig")
    parser.add_argument("--no-screen", action="store_true", help="Monte Carlo at every check")
    parser.add_argument("--temperature-K", type=float, default=300.0, help="Langevin temperature (K)")
    parser.add_argument("--timestep-fs", type=float, default=0.5, help="time step (fs)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads (blip md's default)")
    parser.add_argument("--device", default="cpu", help="torch device")
    return parser.parse_args(argv)


def timed_run(start: Atoms, calc: BLIPCalculator, args: argparse.Namespace, out: Path | None) -> tuple[float, float]:
    """Wall and CPU seconds per step of one seeded Langevin run, monitored when ``out`` is given."""
    atoms = start.copy()
    atoms.calc = calc
    rng = np.random.default_rng(0)
    thermalize(atoms, args.temperature_K, rng=rng)
    dyn = make_dynamics(atoms, "nvt-langevin", timestep_fs=args.timestep_fs, temperature_K=args.temperature_K, rng=rng)
    if out is not None:
        writers = [ExtXYZFrameWriter(out / "flagged.extxyz"), HDF5FrameWriter(out / "flagged.h5")]
        thresholds = Thresholds(calibrated_flag=DEFAULT_THRESHOLDS.calibrated_flag)  # blip md's flag; no halt
        monitor = UncertaintyMonitor(
            dyn, thresholds=thresholds, writers=writers, n_samples=args.n_samples, screen=not args.no_screen,
            schedule=MDConfig(uq_interval=args.uq_interval, uq_max_interval=args.uq_max_interval,
                              uq_quiet_ratio=args.uq_quiet_ratio).schedule(),  # blip md's schedule
        )  # fmt: skip
        dyn.attach(monitor, interval=1)  # run_md's way: the monitor's schedule says which steps are checked
    dyn.run(5)  # warm-up: first graph, allocator, lazy imports
    wall, cpu = time.perf_counter(), time.process_time()
    dyn.run(args.steps)
    return (time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    model_path = args.model
    calc = BLIPCalculator.from_checkpoint(model_path, mode="map", n_samples=args.n_samples, seed=0, device=args.device)
    start = read_structure(args.structure)
    plain, monitored = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            plain.append(timed_run(start, calc, args, None))
            monitored.append(timed_run(start, calc, args, Path(tmp)))
    (plain_wall, plain_cpu), (mon_wall, mon_cpu) = np.array(plain).T, np.array(monitored).T
    ratio = float(mon_cpu.min() / plain_cpu.min())
    result = {
        "model": str(model_path),
        "n_atoms": len(start),
        "steps": args.steps,
        "repeats": args.repeats,
        "n_samples": args.n_samples,
        "uq_interval": args.uq_interval,
        "uq_max_interval": args.uq_max_interval,
        "uq_quiet_ratio": args.uq_quiet_ratio,
        "screen": not args.no_screen,
        "device": args.device,
        "torch_threads": args.torch_threads,
        "plain_ms_per_step": 1e3 * plain_cpu.min(),
        "monitored_ms_per_step": 1e3 * mon_cpu.min(),
        "ratio": ratio,
        "ratio_wall": float(mon_wall.min() / plain_wall.min()),
        "wall_ms_per_step_all": {
            "plain": (1e3 * plain_wall).round(3).tolist(),
            "monitored": (1e3 * mon_wall).round(3).tolist(),
        },
        "limit": LIMIT,
        "pass": ratio <= LIMIT,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
