"""``blip train CONFIG.yaml --train FILE --val FILE --out DIR``."""

from __future__ import annotations

import argparse

from blip_ase.cli.compute import add_compute_options
from blip_ase.strict_json import dumps

HELP = "train a BLIP (or, with --deterministic, a plain) potential; writes OUT/model.pt and OUT/log.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (unknown keys are rejected)")
    parser.add_argument("--train", required=True, help="training data: extxyz, ASE db or HDF5 with energies and forces")
    parser.add_argument("--val", required=True, help="validation data (same formats); selects the best checkpoint")
    parser.add_argument("--out", required=True, help="output directory for model.pt and log.csv")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument("--deterministic", action="store_true", help="train the same architecture without BLIP")
    parser.add_argument(
        "--ensemble", type=int, default=None, metavar="N",
        help="override the config's ensemble: train N seeds into OUT/member_<k>/ and write the ensemble OUT/model.pt",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_compute_options(parser, device_help="override the config's device (cpu, cuda, cuda:1)")


def run(args: argparse.Namespace) -> int:
    from blip_ase.training import load_config, train

    overrides = {"epochs": args.epochs, "seed": args.seed, "device": args.device, "ensemble": args.ensemble}
    if args.deterministic:
        overrides["deterministic"] = True
    if args.no_progress:
        overrides["progress"] = False
    cfg = load_config(args.config, **overrides)
    summary = train(cfg, args.train, args.val, args.out, overwrite=args.overwrite)
    print(dumps(summary))
    return 0
