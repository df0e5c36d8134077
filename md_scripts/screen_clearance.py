"""How many Monte Carlo checks the uncertainty screen clears, per checkpoint (NH3, ``run_md``).

    OMP_NUM_THREADS=1 python md_scripts/screen_clearance.py CHECKPOINT ... [--runs 300:0 300:1 600:0]

Each run: Langevin NH3, 300 steps, a check every 10 steps (fixed schedule), 16 samples, flag
0.25 / halt 1.0 eV/A, the screen on (the loop of ``tests/test_screen.py``); prints the checks the
screen cleared out of all checks. The screen and the calibration (one scale, or the power map of
``blip calibrate --power``) are the checkpoint's own.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--runs", nargs="+", default=["300:0", "300:1", "600:0"], help="TEMPERATURE:SEED pairs")
    args = parser.parse_args(argv)
    import torch

    from blip_ase.md import MDConfig, Thresholds, run_md
    from blip_ase.md.writers import read_history

    torch.set_num_threads(1)
    for path in args.models:
        out = []
        for spec in args.runs:
            temperature, seed = spec.split(":")
            with tempfile.TemporaryDirectory() as d:
                run_md(MDConfig(model=path, out=f"{d}/o", steps=300, temperature_K=float(temperature), seed=int(seed),
                                n_samples=16, plot=False, uq_max_interval=10,
                                thresholds=Thresholds(force_std_flag=0.25, force_std_halt=1.0)))  # fmt: skip
                rows = read_history(f"{d}/o/uncertainty.csv")
            cleared = sum(np.isfinite(r["screen_bound"]) for r in rows)
            out.append(f"{temperature} K seed {seed}: {cleared}/{len(rows)}")
        print(f"{path}: " + "; ".join(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
