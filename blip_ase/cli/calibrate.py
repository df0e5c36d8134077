"""``blip calibrate --model CKPT --data VAL [HOT ...] --out CKPT2 [--isotonic] [--power [--structure]]``."""

from __future__ import annotations

import argparse

from blip_ase.cli.compute import add_compute_options
from blip_ase.strict_json import dumps

HELP = "fit variance scale factors (and optionally isotonic recalibration) on validation data; writes a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint to calibrate (BLIP, MC dropout or ensemble)")
    parser.add_argument(
        "--data", required=True, nargs="+",
        help="validation data with energies and forces (>= 5 structures); several files are fitted as one set "
             "(for example the validation split and labelled frames from hotter MD)",
    )
    parser.add_argument("--out", required=True, help="path of the calibrated checkpoint (not the input)")
    parser.add_argument(
        "--isotonic", action="store_true", help="also fit isotonic recalibration (Kuleshov et al. 2018)"
    )
    parser.add_argument(
        "--power", action="store_true",
        help="also fit a power-law map of the force variances, s * v_ref * (v / v_ref)^gamma (docs/method.md)",
    )
    parser.add_argument(
        "--structure", action="store_true",
        help="with --power: the map also grows with the structure's mean variance, (m / m_ref)^delta (docs/method.md)",
    )
    parser.add_argument("--n-samples", type=int, default=100, help="Monte Carlo samples (an ensemble uses its members)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo noise")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_compute_options(parser)


def run(args: argparse.Namespace) -> int:
    from blip_ase.uq.evaluate import calibrate

    result = calibrate(
        args.model, args.data, args.out, isotonic=args.isotonic, power=args.power, structure=args.structure,
        n_samples=args.n_samples, seed=args.seed,
        device=args.device, overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"calibration: {dumps(result['calibration'], indent=None)}")
    print(f"{'on the calibration set':<24}{'before':>12}{'after':>12}")
    for key in ("forces_nll", "forces_ece", "energy_nll"):
        print(f"{key:<24}{result['before'][key]:>12.4g}{result['after'][key]:>12.4g}")
    ref = result["reference"]
    levels = ", ".join(f"q{round(100 * q)}" for q in ref["quantiles"])
    print(f"per-atom force error / calibrated std on the calibration set, eV/A ({levels}):")
    for key in ref["force_error"]:
        errors = " ".join(f"{v:.3g}" for v in ref["force_error"][key])
        stds = " ".join(f"{v:.3g}" for v in ref["force_std"][key])
        print(f"  {key:<4} error {errors}  |  std {stds}")
    print(f"wrote {args.out}")
    return 0
