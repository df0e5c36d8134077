"""Detection benchmark of the monitor's check policies, from one run: what a cheaper policy misses.

A suite of batched walker runs (``run_walkers``, torch-sim NVE by default) is run with the reference
policy (``--no-screen``: S Monte Carlo samples every ``uq_interval`` steps) and with candidate
policies, from the same seeds. A candidate is ``--candidate NAME=JSON``, :class:`~blip_ase.md.MDConfig`
fields over the reference's; the default candidates are :data:`CANDIDATES` (the uncertainty
screen of the model, the adaptive check interval, and both). The suites:

- ``shipped``: the shipped NH3 model, N walkers at temperatures cycling through ``--temperatures``;
- ``undertrained``: a model trained for ``--undertrained-epochs`` epochs on the ammonia training
  split and calibrated on its validation split (so it has a screen), the same walkers: it must halt.

With NVE (the default ``--ensemble``) every walker follows the same trajectory under both
policies whatever happens to its batch-mates (MAP forces move the atoms; the samples draw from
per-walker generators; velocities start from the walker's temperature), so the policies are
compared on identical frames. With ``nvt-langevin`` they agree only while they halt the same
walkers at the same steps: torch-sim draws the thermostat noise of the whole batch from one
global generator, so a walker that leaves the batch in one policy and not in the other changes
the others' noise from then on. Reported per suite:

- halt recall: reference halts (walker, step) that the candidate halts within ``--window`` steps;
- flag recall: reference flagged checks (walker, step) that the candidate flags within the window;
- extra false halts: candidate halts with no reference halt of that walker within the window, as a
  fraction of the walkers;
- throughput (walker-steps/s) of both policies and of the plain batched MAP run (the same loop
  with a single check at step 0, whose time is subtracted), and the monitored / plain ratios, in
  wall-clock time and in CPU time of this process (``*_cpu``: robust when other jobs share the
  machine, with one torch thread);
- checks and checks with samples (not screened) per reference check: the cost in checks,
  independent of the machine's load.

    OMP_NUM_THREADS=1 python md_scripts/bench_detection.py --walkers 64 --steps 500 --out bench_detection.json
    python md_scripts/bench_detection.py --candidate anchored='{"screen": true, "screen_anchor_steps": 50}'
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from blip_ase.md import MDConfig, PhysicalChecks, Thresholds
from blip_ase.md.walkers import WalkersConfig, run_walkers
from blip_ase.md.writers import read_history

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {
    "screen": {"screen": True},
    "adaptive 40": {"screen": False, "uq_max_interval": 40},
    "screen + adaptive 40": {"screen": True, "uq_max_interval": 40},
}
"""The default candidate policies (MDConfig fields)."""


def candidate(text: str) -> tuple[str, dict]:
    """``NAME=JSON`` -> (name, MDConfig fields)."""
    name, sep, fields = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    try:
        value = json.loads(fields)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"candidate {name}: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"candidate {name}: expected a JSON object of MDConfig fields")
    return name, value


def events(history: list[dict], level: int) -> dict[int, list[int]]:
    """Walker -> steps of the checks at ``level`` or above."""
    out: dict[int, list[int]] = {}
    for row in history:
        if row["level"] >= level:
            out.setdefault(int(row["walker"]), []).append(int(row["step"]))
    return out


def recall(reference: dict[int, list[int]], candidate: dict[int, list[int]], window: int) -> tuple[int, int]:
    """(matched, total) reference events with a candidate event of the same walker within ``window``."""
    total = matched = 0
    for walker, steps in reference.items():
        theirs = np.asarray(candidate.get(walker, []))
        for step in steps:
            total += 1
            matched += bool(theirs.size and np.abs(theirs - step).min() <= window)
    return matched, total


def compare(ref_dir: Path, cand_dir: Path, n_walkers: int, window: int) -> dict:
    """The detection metrics of the candidate's run against the reference's."""
    ref, cand = read_history(ref_dir / "uncertainty.csv"), read_history(cand_dir / "uncertainty.csv")
    halts = recall(events(ref, 2), events(cand, 2), window)
    flags = recall(events(ref, 1), events(cand, 1), window)
    false = recall(events(cand, 2), events(ref, 2), window)
    return {
        "reference_halts": halts[1],
        "halt_recall": halts[0] / halts[1] if halts[1] else None,
        "reference_flags": flags[1],
        "flag_recall": flags[0] / flags[1] if flags[1] else None,
        "candidate_halts": false[1],
        "extra_false_halts": (false[1] - false[0]) / n_walkers,
        "checks_over_reference": len(cand) / max(len(ref), 1),
        "sampled_checks_over_reference": sum(not np.isfinite(r.get("screen_bound", np.nan)) for r in cand)
        / max(len(ref), 1),
        "checks_screened": sum(np.isfinite(r.get("screen_bound", np.nan)) for r in cand) / max(len(cand), 1),
    }


def undertrained_model(out: Path, epochs: int) -> Path:
    """A BLIP model of the ammonia config trained for only ``epochs`` epochs, then calibrated."""
    from blip_ase.training import train
    from blip_ase.training.config import load_config
    from blip_ase.uq.evaluate import calibrate

    examples = ROOT / "examples" / "ammonia"
    config = load_config(examples / "config.yaml", epochs=epochs, progress=False)
    train(config, examples / "train.extxyz", examples / "val.extxyz", out / "undertrained")
    calibrate(out / "undertrained" / "model.pt", examples / "val.extxyz", out / "undertrained_cal.pt", n_samples=32)
    return out / "undertrained_cal.pt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--walkers", type=int, default=64)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[300, 600, 900, 1200, 1500])
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--uq-interval", type=int, default=10)
    parser.add_argument("--flag", type=float, default=0.25, help="flag threshold, eV/A")
    parser.add_argument("--halt", type=float, default=1.0, help="halt threshold, eV/A")
    parser.add_argument("--window", type=int, default=20, help="steps within which an event counts as recalled")
    parser.add_argument("--undertrained-epochs", type=int, default=20)
    parser.add_argument("--suites", nargs="+", default=["shipped", "undertrained"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ensemble", default="nve", choices=["nve", "nvt-langevin"])
    parser.add_argument("--candidate", type=candidate, action="append", default=None,
                        help="NAME=JSON: a candidate policy (MDConfig fields); default: CANDIDATES")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_detection.json")
    args = parser.parse_args(argv)
    candidates = dict(args.candidate) if args.candidate else CANDIDATES
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    temperatures = tuple(args.temperatures[k % len(args.temperatures)] for k in range(args.walkers))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"shipped": None}
        if "undertrained" in args.suites:
            models["undertrained"] = str(undertrained_model(tmp, args.undertrained_epochs))

        thresholds = Thresholds(force_std_flag=args.flag, force_std_halt=args.halt)

        def run(name: str, model, **options) -> dict:
            options = {"uq_interval": args.uq_interval, "thresholds": thresholds, **options}
            md = MDConfig(
                model=model, out=str(tmp / name), steps=args.steps, seed=args.seed, n_samples=args.n_samples,
                device=args.device, plot=False, ensemble=args.ensemble, **options,
            )  # fmt: skip
            cpu = time.process_time()
            summary = run_walkers(WalkersConfig(md, n_walkers=args.walkers, temperatures_K=temperatures))
            cpu = time.process_time() - cpu
            t = summary["timings"]
            return {"walker_steps_per_s": t["walker_steps"] / t["wall_seconds"], "summary": summary,
                    "walker_steps_per_cpu_s": t["walker_steps"] / cpu, "cpu_seconds": cpu}  # fmt: skip

        run("warm-up", None, uq_interval=5, screen=True)  # imports and first-call costs
        for suite in args.suites:
            model = models[suite]
            reference = run(f"{suite}_reference", model, screen=False)
            plain = run(f"{suite}_plain", model, uq_interval=args.steps + 1, thresholds=Thresholds(),
                        physical=PhysicalChecks(enabled=False))  # fmt: skip
            t = plain["summary"]["timings"]
            plain_rate = t["walker_steps"] / (t["wall_seconds"] - t["uq_seconds"])
            plain_cpu_rate = plain["walker_steps_per_cpu_s"]
            row = {
                "reference_walker_steps_per_s": reference["walker_steps_per_s"],
                "plain_walker_steps_per_s": plain_rate,
                "reference_over_plain": reference["walker_steps_per_s"] / plain_rate,
                "reference_over_plain_cpu": reference["walker_steps_per_cpu_s"] / plain_cpu_rate,
                "reference_halted_walkers": reference["summary"]["n_halted"],
                "candidates": {},
            }
            for label, fields in candidates.items():
                name = f"{suite}_{len(row['candidates'])}"
                result = run(name, model, **fields)
                metrics = compare(tmp / f"{suite}_reference", tmp / name, args.walkers, args.window)
                metrics.update(
                    walker_steps_per_s=result["walker_steps_per_s"],
                    over_plain=result["walker_steps_per_s"] / plain_rate,
                    over_plain_cpu=result["walker_steps_per_cpu_s"] / plain_cpu_rate,
                    halted_walkers=result["summary"]["n_halted"],
                )
                row["candidates"][label] = metrics
            results[suite] = row
            print(f"{suite}: reference {row['reference_walker_steps_per_s']:.0f} walker-steps/s "
                  f"({row['reference_over_plain']:.2f} x plain {plain_rate:.0f})", flush=True)  # fmt: skip
            for name, m in row["candidates"].items():
                print(f"  {name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in m.items()), flush=True)  # fmt: skip
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "candidate")},
                     "candidates": candidates},  # fmt: skip
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": args.device},
        "wall_seconds": time.perf_counter() - started,
        "suites": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['wall_seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
