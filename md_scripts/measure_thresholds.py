"""Distribution of the monitored uncertainty in unhalted runs: where to put the MD thresholds.

    python md_scripts/measure_thresholds.py --out runs/thresholds [--model PATH] [--steps 2000]

For every temperature and seed, runs ``blip md`` (Langevin, the CLI's defaults: 0.5 fs,
16 Monte Carlo samples every 10 steps) with no thresholds, so nothing halts, and prints one
markdown row per temperature with the median, 99th percentile and maximum of the largest
per-atom force standard deviation (eV/A) over all checks, each as the range over the seeds.
Thresholds are in the units of the model's calibrated variances.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def _range(values: list[float], fmt: str = ".2f") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/thresholds")
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[300, 600, 900, 1200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    import torch

    from blip_ase.md import MDConfig, Thresholds, run_md

    torch.set_num_threads(1)
    print("| T (K) | median | 99th percentile | max |\n|---|---|---|---|")
    for temperature in args.temperatures:
        stats = []
        for seed in args.seeds:
            out = Path(args.out) / f"T{temperature:g}_seed{seed}"
            cfg = MDConfig(model=args.model, out=str(out), steps=args.steps, temperature_K=temperature, seed=seed,
                           thresholds=Thresholds(), overwrite=True, plot=False)
            run_md(cfg)
            with open(out / "uncertainty.csv") as fh:
                std = np.array([float(row["max_force_std"]) for row in csv.DictReader(fh)])
            stats.append((np.median(std), np.percentile(std, 99), std.max()))
        cells = [_range([s[k] for s in stats]) for k in range(3)]
        print(f"| {temperature:g} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
