"""Throughput of batched many-walker monitored MD against separate ``blip md`` runs, from one run.

For each N, N NH3 walkers of the shipped model run as one batch (``run_walkers``, torch-sim
Langevin), as the same batch without monitoring (plain batched MAP MD: the same loop with one
check at step 0, whose time is subtracted; no physical checks), and, for comparison, as separate
``run_md`` runs (ASE Langevin, one calculator each):
the same steps, temperature, thresholds, Monte Carlo samples and check interval, walker ``k``
seeded ``k`` in both. Separate runs are independent and run one after another, so N of them take
N times one run: ``--separate-runs M`` times M of them (``min(M, N)``) and scales to N.
Throughput is walker-steps per second of the runs' own wall time (model loading excluded for
both). Prints a table and writes JSON with the ratios.

    OMP_NUM_THREADS=1 python md_scripts/bench_walkers.py --walkers 1 4 16 64 --out bench_walkers.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from blip_ase.md import MDConfig, PhysicalChecks, Thresholds, run_md
from blip_ase.md import walkers
from blip_ase.md.walkers import WalkersConfig, run_walkers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--walkers", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--uq-interval", type=int, default=10)
    parser.add_argument("--temperature-K", type=float, default=300.0)
    parser.add_argument("--separate-runs", type=int, default=4, help="separate runs timed per N (scaled to N)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both engines)")
    parser.add_argument(
        "--mc-batch-atoms", type=int, default=None,
        help="atoms per batched Monte Carlo pass of the walkers on CPU (default: walkers.CPU_MAX_BATCH_ATOMS)",
    )  # fmt: skip
    parser.add_argument("--no-screen", action="store_true", help="Monte Carlo at every check (the reference policy)")
    parser.add_argument("--uq-max-interval", type=int, default=None, help="adaptive checks up to this gap (MDConfig)")
    parser.add_argument("--uq-quiet-ratio", type=float, default=MDConfig.uq_quiet_ratio, help="see MDConfig")
    parser.add_argument("--out", default="bench_walkers.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mc_batch_atoms is not None:
        walkers.CPU_MAX_BATCH_ATOMS = args.mc_batch_atoms
    thresholds = Thresholds(force_std_flag=0.25, force_std_halt=1.0)  # blip md's defaults for the shipped model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def md(name: str, seed: int = 0, **options) -> MDConfig:
            options = {"uq_interval": args.uq_interval, "thresholds": thresholds,
                       "uq_max_interval": args.uq_max_interval, "uq_quiet_ratio": args.uq_quiet_ratio,
                       **options}  # fmt: skip
            return MDConfig(
                out=str(Path(tmp) / name), steps=args.steps, temperature_K=args.temperature_K, seed=seed,
                n_samples=args.n_samples, plot=False, device=args.device, screen=not args.no_screen,
                **options,
            )  # fmt: skip

        run_walkers(WalkersConfig(md("warm-up"), n_walkers=2))  # imports and first-call costs
        for n in args.walkers:
            batch = run_walkers(WalkersConfig(md(f"batch{n}"), n_walkers=n))["timings"]
            unmonitored = md(f"plain{n}", uq_interval=args.steps + 1, uq_max_interval=None, thresholds=Thresholds(),
                             physical=PhysicalChecks(enabled=False))  # fmt: skip
            plain = run_walkers(WalkersConfig(unmonitored, n_walkers=n))["timings"]
            plain_rate = plain["walker_steps"] / (plain["wall_seconds"] - plain["uq_seconds"])
            m = min(n, args.separate_runs)
            timings = [run_md(md(f"single{n}_{k}", seed=k))["timings"] for k in range(m)]
            separate = [t["wall_seconds"] for t in timings]
            single_rate = m * args.steps / sum(separate)
            checks = args.steps // args.uq_interval + 1  # step 0 is checked too
            batch_rate = batch["walker_steps"] / batch["wall_seconds"]
            rows.append({
                "walkers": n,
                "batched_walker_steps_per_s": batch_rate,
                "separate_walker_steps_per_s": single_rate,
                "ratio": batch_rate / single_rate,
                "plain_batched_walker_steps_per_s": plain_rate,
                "monitored_over_plain": batch_rate / plain_rate,
                "batched_seconds": batch["wall_seconds"],
                "batched_uq_seconds": batch["uq_seconds"],
                "separate_runs_timed": m,
                "separate_seconds_per_run": sum(separate) / m,
                # per walker: Monte Carlo seconds per check, and the rest (MAP dynamics, writers) per step
                "batched_check_seconds_per_walker": batch["uq_seconds"] / checks / n,
                "separate_check_seconds": sum(t["uq_seconds"] for t in timings) / checks / m,
                "batched_step_seconds_per_walker": (batch["wall_seconds"] - batch["uq_seconds"]) / args.steps / n,
                "separate_step_seconds": sum(t["wall_seconds"] - t["uq_seconds"] for t in timings) / args.steps / m,
            })  # fmt: skip
            r = rows[-1]
            print(f"N={n:3d}: batched {batch_rate:8.1f} walker-steps/s, separate {single_rate:6.1f} "
                  f"({m} runs timed), ratio {r['ratio']:.2f}; plain batched {plain_rate:8.1f}, monitored / plain "
                  f"{r['monitored_over_plain']:.2f}", flush=True)  # fmt: skip
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "device": args.device},  # fmt: skip
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
