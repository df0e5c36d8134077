"""How often MD with a model stops on a physical check: NH3 runs per checkpoint, temperature and seed.

    OMP_NUM_THREADS=1 python md_scripts/md_stability.py NAME=CHECKPOINT ... [--temperatures 900 1200]
        [--seeds 0 1 2 3 4 5] [--steps 1000]

Runs :func:`blip_ase.md.run_md` (Langevin, the defaults of ``blip md``: 0.5 fs, 4 Monte Carlo
samples every 10 steps here, calibrated default thresholds, physical checks on) from the shipped
NH3 structure and prints, per checkpoint, each run's status, stop check and halt step, then the
number of runs that a physical check (fragmented, too_close, energy_jump, runaway) halted. A
model whose MAP dynamics lets NH3 fall apart at 900-1200 K is halted there: the count compares
checkpoints (for example training seeds) on the stability of their dynamics, on no labelled data.
"""

from __future__ import annotations

import argparse
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", metavar="NAME=CHECKPOINT")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[900.0, 1200.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args(argv)
    import torch

    from blip_ase.md import MDConfig, run_md
    from blip_ase.md.physics import CHECKS

    torch.set_num_threads(1)
    for spec in args.models:
        name, path = spec.split("=", 1)
        runs, halted = [], 0
        for temperature in args.temperatures:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as out:
                    s = run_md(MDConfig(model=path, out=f"{out}/md", temperature_K=temperature, seed=seed,
                                        steps=args.steps, n_samples=4, plot=False))  # fmt: skip
                checks = set((s.get("stop_check") or "").split("+"))
                halted += bool(checks & set(CHECKS))
                stop = f"{s.get('stop_check') or ''} {s.get('halt_step') or ''}".strip()
                runs.append(f"{temperature:g} K s{seed}: {s['status']} {stop}".strip())
        print(f"{name}: physical halts {halted} of {len(runs)}")
        print("  " + "; ".join(runs), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
