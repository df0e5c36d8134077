"""Calibrated against absolute MD thresholds on one model: flagged checks and first halt per run.

    python md_scripts/compare_thresholds.py --out runs/compare_thresholds [--model PATH] [--steps 2000]

For every temperature and seed, runs ``blip md`` (Langevin, the CLI's defaults: 0.5 fs, 16 Monte
Carlo samples every 10 steps) with a flag threshold of 0 and no halt, so that every check is
exported with its per-atom force stds, then replays the checks against an absolute pair
(``--absolute``, eV/A, one value for every atom) and calibrated pairs (``--calibrated``:
multiples of the q99 of the model's per-element calibration force errors, resolved as ``blip md``
resolves them) and prints one markdown row per temperature: flagged checks summed over the seeds
and the first step above the halt threshold (``-``: none) per seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/compare_thresholds")
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[300, 600, 900, 1200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--absolute", type=float, nargs=2, default=[0.25, 1.0], metavar=("FLAG", "HALT"))
    parser.add_argument("--calibrated", type=float, nargs="+", default=[1.2, 4.5, 1.4, 5.6], help="FLAG HALT pairs")
    args = parser.parse_args(argv)
    import torch
    from ase.io import read

    from blip_ase.md import MDConfig, Thresholds, run_md
    from blip_ase.md.inputs import model_path

    torch.set_num_threads(1)
    path = model_path(MDConfig(model=args.model))
    reference = torch.load(path, weights_only=True)["reference"]
    pairs = list(zip(args.calibrated[::2], args.calibrated[1::2]))
    flag, halt = args.absolute
    specs = {f"{flag:g} / {halt:g} eV/A": Thresholds(force_std_flag=flag, force_std_halt=halt)}
    specs.update({f"{f:g} / {h:g} x q99": Thresholds(calibrated_flag=f, calibrated_halt=h) for f, h in pairs})
    names = list(specs)
    print("| T (K) | " + " | ".join(names) + " |")
    print("|" + "---|" * (len(names) + 1))
    for temperature in args.temperatures:
        counts, halts = dict.fromkeys(names, 0), {name: [] for name in names}
        for seed in args.seeds:
            out = Path(args.out) / f"T{temperature:g}_seed{seed}"
            run_md(MDConfig(model=args.model, out=str(out), steps=args.steps, temperature_K=temperature, seed=seed,
                            thresholds=Thresholds(force_std_flag=0.0), overwrite=True, plot=False))  # fmt: skip
            frames = read(out / "flagged.extxyz", ":")
            std = np.sqrt(np.array([a.arrays["blip_forces_variance"] for a in frames]))  # (checks, atoms)
            symbols = frames[0].get_chemical_symbols()
            for name, spec in specs.items():
                flag, halt = spec.resolve(reference, sorted(set(symbols))).atom_thresholds(symbols)
                counts[name] += int((std > flag).any(axis=1).sum())
                above = np.nonzero((std > halt).any(axis=1))[0]
                halts[name].append(str(frames[above[0]].info["step"]) if len(above) else "-")
        cells = [f"{counts[name]} flagged, halt {'/'.join(halts[name])}" for name in names]
        print(f"| {temperature:g} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
