"""``blip`` entry point. Subcommands are imported lazily so ``blip --help`` is instant.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from blip_ase.cli.compute import apply_compute_options

SUBCOMMANDS = {
    "train": "blip_ase.cli.train",
    "md": "blip_ase.cli.md",
    "eval": "blip_ase.cli.eval",
    "calibrate": "blip_ase.cli.calibrate",
    "llpr": "blip_ase.cli.llpr",
    "learn": "blip_ase.cli.learn",
}
HELP = {
    "train": "train a BLIP (or deterministic) potential",
    "md": "run uncertainty-monitored molecular dynamics",
    "eval": "evaluate accuracy and uncertainty (ECE, NLL, CRPS, Spearman, AUROC) of a checkpoint",
    "calibrate": "fit variance scale factors (optionally isotonic) on validation data",
    "llpr": "fit LLPR (last-layer prediction rigidity) variances post hoc on a deterministic model",
    "learn": "active learning: monitored MD, selection, DFT/ASE/external labels, fine-tuning, round after round",
}


def given_options(module, argv: list[str]) -> set[str]:
    """Destinations of the options written on the command line (not left at their defaults)."""
    probe = argparse.ArgumentParser(add_help=False)
    module.add_arguments(probe)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_known_args(argv)[0]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="blip", description="Bayesian Learned Interatomic Potentials for ASE.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        sub.add_parser(name, help=HELP[name], add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ["--help"])
        return 0
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    cmd_parser = argparse.ArgumentParser(
        prog=f"blip {argv[0]}",
        description=module.HELP,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    args.given_options = given_options(module, argv[1:])
    args.argv = argv[1:]
    try:
        apply_compute_options(args)
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"blip {argv[0]}{_rank()}: error: {exc}", file=sys.stderr)
        return 2


def _rank() -> str:
    """`` (rank R of N)`` in a process that torchrun started, else empty."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world != "1" else ""


if __name__ == "__main__":
    sys.exit(main())
