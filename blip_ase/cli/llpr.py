"""``blip llpr --model DET --train TRAIN --val VAL --out CKPT [--regularizer L]``."""

from __future__ import annotations

import argparse

from blip_ase.cli.compute import add_compute_options

HELP = "fit LLPR (last-layer prediction rigidity) variances post hoc on a deterministic model; writes a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="deterministic checkpoint (blip train with deterministic: true)")
    parser.add_argument("--train", required=True, help="training data with energies and forces (the covariance)")
    parser.add_argument("--val", required=True, help="validation data with energies and forces (the scale, >= 5)")
    parser.add_argument("--out", required=True, help="path of the LLPR checkpoint (not the input)")
    parser.add_argument("--regularizer", type=float, default=None,
                        help="fixed lambda (sigma^2 = lambda * trace(C) / D); default: chosen on --val")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_compute_options(parser)


def run(args: argparse.Namespace) -> int:
    from blip_ase.uq.llpr import llpr_checkpoint

    summary = llpr_checkpoint(args.model, args.train, args.val, args.out, regularizer=args.regularizer,
                              device=args.device, overwrite=args.overwrite)  # fmt: skip
    print(f"LLPR: {summary['n_features']} last-layer features, {summary['n_train']} training structures")
    print(f"  energy / force row weights {summary['energy_weight']:.4g} eV^-2 / {summary['forces_weight']:.4g} (eV/A)^-2")
    print(f"  regularizer lambda {summary['regularizer']:.3g} (sigma^2 {summary['sigma2']:.4g}), "
          f"scale alpha^2 {summary['scale']:.4g}, validation force NLL {summary['val_forces_nll']:.4g}")
    print(f"wrote {args.out}")
    return 0
