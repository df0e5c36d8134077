"""False-positive rate of the physical checks on normal runs of the shipped model.

    python md_scripts/physical_checks.py --out runs/physical [--steps 2000] [--runs 300:0 1200:1 ...] [--model PATH]

Runs ``blip md`` (Langevin, the CLI's defaults: 0.5 fs, checks every 10 steps, trajectory every
10 steps) for every ``(temperature, seed)`` in ``--runs`` and prints one markdown row per run:
whether NH3 genuinely dissociates (at the end of the unhalted run an atom's nearest other atom is
further than ``--dissociated-A``; a halt of such a run is a true positive), the margins of each
check over the unhalted run's frames (``md.traj``, ``md.log``), and the status and stop check of
the run with the default checks:

- ``bond x``: the bond factor the graph needs to stay connected (max over frames of the largest
  edge of the minimum spanning tree of ``d_ij / (r_i + r_j)``); fragmented above ``--bond-factor``;
- ``isolated A``: the largest nearest-neighbour distance (Angstrom); fragmented above the cutoff;
- ``close x``: the smallest ``d_ij / (r_i + r_j)``; too_close below ``--min-distance-factor``;
- ``T/target``: the largest minimum of T / target over ``temperature_checks`` consecutive
  frames; runaway above ``--runaway-temperature-factor``;
- ``dE eV/atom``: the largest change of the total energy per atom between consecutive frames
  (``md.log``, MAP potential energy; the check uses the Monte Carlo mean, a few meV apart).

Each run is made twice: once with nothing halting (``--no-physical-checks``, no force-std halt:
the truth, whose final geometry says whether NH3 dissociated, and whose frames give the margins),
once with the defaults (the verdict). A physical halt of a run that did not dissociate is a false
positive; a dissociating run that does not halt is a false negative.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from blip_ase.md.physics import CHECKS as PHYSICAL

DEFAULT_RUNS = ["300:0", "300:1", "600:0", "600:1", "900:0", "900:2", "1200:0", "1200:1", "1200:2", "1200:3"]


def margins(out: Path, target_K: float, window: int) -> dict:
    """The per-run margins of the module docstring, from ``out/md.traj`` and ``out/md.log``."""
    from ase.data import covalent_radii
    from ase.io import read
    from scipy.sparse.csgraph import minimum_spanning_tree

    frames = read(out / "md.traj", ":")
    bond, close, isolated = [], [], []
    for atoms in frames:
        d = atoms.get_all_distances(mic=atoms.pbc.any())
        r = covalent_radii[atoms.numbers]
        ratio = d / (r[:, None] + r[None, :])
        bond.append(float(minimum_spanning_tree(ratio + 1e-12 * (ratio == 0)).toarray().max()))
        np.fill_diagonal(ratio, np.inf)
        np.fill_diagonal(d, np.inf)
        close.append(float(ratio.min()))
        isolated.append(float(d.min(axis=1).max()))
    log = np.loadtxt(out / "md.log", skiprows=1)
    n = len(frames[0])
    temperature = log[:, 4] / target_K if target_K else np.zeros(len(log))
    hot = max(temperature[k : k + window].min() for k in range(max(len(temperature) - window + 1, 1)))
    energy = log[:, 1] / n
    return {
        "bond": max(bond),
        "isolated": max(isolated),
        "close": min(close),
        "hot": float(hot),
        "jump": float(np.abs(np.diff(energy)).max()) if len(energy) > 1 else 0.0,
        "final_isolated": isolated[-1],
    }


def blip_md(temperature: str, seed: str, steps: int, out: Path, *extra: str) -> dict:
    """One ``blip md`` run (Langevin, CLI defaults; ``extra`` flags, e.g. ``--model``); returns its summary."""
    cmd = [sys.executable, "-m", "blip_ase.cli.main", "md", "--temperature-K", temperature, "--seed", seed]
    cmd += ["--steps", str(steps), "--out", str(out), "--overwrite", "--no-progress", "--no-plot", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/physical")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="TEMPERATURE:SEED pairs")
    parser.add_argument("--dissociated-A", type=float, default=2.5, help="nearest-neighbour distance of a lost atom")
    parser.add_argument("--window", type=int, default=5, help="consecutive checks of the runaway margin")
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    args = parser.parse_args(argv)
    model = ["--model", args.model] if args.model else []
    print("| T (K) | seed | dissociated | bond x | isolated A | close x | T/target | dE eV/atom | status | stop check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    false_positive = false_negative = n_dissociated = 0
    for spec in args.runs:
        temperature, seed = spec.split(":")
        free = Path(args.out) / f"T{temperature}_s{seed}_free"  # the truth: nothing halts
        truth = ("--no-physical-checks", "--halt-force-std-eV-per-A", "none", *model)
        blip_md(temperature, seed, args.steps, free, *truth)
        m = margins(free, float(temperature), args.window)
        dissociated = m["final_isolated"] > args.dissociated_A
        n_dissociated += dissociated
        summary = blip_md(temperature, seed, args.steps, Path(args.out) / f"T{temperature}_s{seed}", *model)
        checks = set((summary.get("stop_check") or "").split("+"))
        physical = bool(checks & PHYSICAL)
        false_positive += physical and not dissociated
        false_negative += dissociated and summary["status"] != "halted"
        print(
            f"| {temperature} | {seed} | {'yes' if dissociated else 'no'} | {m['bond']:.2f} | {m['isolated']:.2f} | "
            f"{m['close']:.2f} | {m['hot']:.2f} | {m['jump']:.3f} | {summary['status']} | "
            f"{summary.get('stop_check') or '-'} {'at step ' + str(summary['halt_step']) if summary['halt_step'] else ''} |",
            flush=True,
        )
    n = len(args.runs)
    print(f"\nruns in which the molecule dissociates (nothing halting): {n_dissociated} of {n}")
    print(f"physical halts of runs that did not dissociate (false positives): {false_positive} of {n}")
    print(f"dissociating runs that did not halt (false negatives): {false_negative} of {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
