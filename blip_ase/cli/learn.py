"""``blip learn CONFIG --out DIR [--max-rounds N] [--max-labels N]`` and
``blip learn --out DIR --restart``: the active-learning loop.

Thin over :func:`blip_ase.active.run_learn`.
"""

from __future__ import annotations

import argparse
import shlex

from blip_ase.cli.compute import add_compute_options

HELP = "active learning: monitored MD, selection of flagged frames, oracle labels (PySCF, ASE, files), fine-tuning"

EPILOG = """\
Each round explores with uncertainty-monitored MD (one walker per start structure and temperature),
selects at most select.budget flagged frames, labels them with the oracle and fine-tunes the model on
all labels so far. Outputs in --out: state.json, report.csv, report.png and round_<k>/ (flagged.extxyz,
selected.extxyz, labelled.extxyz, model.pt, metrics.json). With oracle.kind external the loop writes
round_<k>/to_label.extxyz and stops; put the labels in round_<k>/labelled.extxyz and run again with
--restart. After a kill, Ctrl-C or SIGTERM, `blip learn --out DIR --restart` continues with the run's
stored settings (--max-rounds/--max-labels of the first run included), without repeating a finished
stage or an existing label. --max-rounds/--max-labels given with --restart change the stored limits;
a config file given with --restart must match the stored one, unless --accept-changes (stop limits and
oracle workers only). Every change is recorded in state.json ("changes").
Exit codes: 0 stopped or waiting for labels, 2 bad input, 130 Ctrl-C, 143 SIGTERM.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("config", nargs="?", default=None,
                        help="learn configuration (YAML; see blip_ase.active.config); optional with --restart")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --restart)")
    parser.add_argument("--max-rounds", type=int, default=None, help="rounds of labelling (overrides stop.max_rounds)")
    parser.add_argument("--max-labels", type=int, default=None, help="oracle calls (overrides stop.max_labels)")
    parser.add_argument("--restart", action="store_true", help="continue the loop in --out with its stored settings")
    parser.add_argument("--accept-changes", action="store_true",
                        help="with --restart and a config file: apply its changed stop limits / oracle workers")
    add_compute_options(parser)


def resume_command(args: argparse.Namespace) -> str:
    """The command that resumes this run exactly (its settings are stored in --out)."""
    device = f" --device {shlex.quote(args.device)}" if getattr(args, "device", None) else ""
    return f"blip learn --out {shlex.quote(str(args.out))} --restart{device}"


def _interrupt(signum, frame):
    from blip_ase import interrupts
    from blip_ase.active.state import Interrupted

    interrupts.handler(Interrupted)(signum, frame)


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from blip_ase import interrupts
    from blip_ase.active import load_learn_config, run_learn

    if args.config is None and not args.restart:
        raise ValueError("a config file is needed to start a loop (only --restart continues without one)")
    config = None if args.config is None else load_learn_config(args.config)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers need it
    handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main_thread else {}
    try:
        state = run_learn(config, args.out, max_rounds=args.max_rounds, max_labels=args.max_labels,
                          restart=args.restart, accept_changes=args.accept_changes, device=args.device)  # fmt: skip
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"blip learn: interrupted by {signal.Signals(signum).name}; continue with: {resume_command(args)}")
        return 128 + signum
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        interrupts.clear()
    if state.status == "waiting":
        print(f"waiting for labels: write {state.waiting_for} (frames of to_label.extxyz with energy and "
              f"forces, keeping info frame_id), then run {resume_command(args)}")
        return 0
    print(f"stopped after round {state.round}: {state.stopped}")
    print(f"oracle calls: {state.labels_spent}; model: {state.model}; report: {args.out}/report.csv")
    return 0
