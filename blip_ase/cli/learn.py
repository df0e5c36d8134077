"""``blip learn CONFIG --out DIR [--max-rounds N] [--restart]``: the active-learning loop.

Thin over :func:`blip_ase.active.run_learn`.
"""

from __future__ import annotations

import argparse

from blip_ase.cli.compute import add_compute_options

HELP = "active learning: monitored MD, selection of flagged frames, oracle labels (PySCF, ASE, files), fine-tuning"

EPILOG = """\
Each round explores with uncertainty-monitored MD (one walker per start structure and temperature),
selects at most select.budget flagged frames, labels them with the oracle and fine-tunes the model on
all labels so far. Outputs in --out: state.json, report.csv, report.png and round_<k>/ (flagged.extxyz,
selected.extxyz, labelled.extxyz, model.pt, metrics.json). With oracle.kind external the loop writes
round_<k>/to_label.extxyz and stops; put the labels in round_<k>/labelled.extxyz and run again with
--restart. After a kill, --restart continues without repeating a finished stage or an existing label.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("config", help="learn configuration (YAML; see blip_ase.active.config)")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --restart)")
    parser.add_argument("--max-rounds", type=int, default=None, help="rounds of labelling (overrides stop.max_rounds)")
    parser.add_argument("--restart", action="store_true", help="continue the loop in --out from state.json")
    add_compute_options(parser)


def run(args: argparse.Namespace) -> int:
    from blip_ase.active import load_learn_config, run_learn

    config = load_learn_config(args.config)
    try:
        state = run_learn(config, args.out, max_rounds=args.max_rounds, restart=args.restart, device=args.device)
    except KeyboardInterrupt:
        print(f"blip learn: interrupted; continue with: blip learn {args.config} --out {args.out} --restart")
        return 130
    if state["status"] == "waiting":
        print(f"waiting for labels: write {state['waiting_for']} (frames of to_label.extxyz with energy and "
              f"forces, keeping info frame_id), then run blip learn {args.config} --out {args.out} --restart")
        return 0
    print(f"stopped after round {state['round']}: {state['stopped']}")
    print(f"oracle calls: {state['labels_spent']}; model: {state['model']}; report: {args.out}/report.csv")
    return 0
