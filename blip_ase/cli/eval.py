"""``blip eval --model CKPT --data FILE [--ood FILE] --n-samples S --out DIR``."""

from __future__ import annotations

import argparse

from blip_ase.cli.compute import add_compute_options

HELP = "evaluate a checkpoint: accuracy and uncertainty metrics, OOD AUROC, plots; writes OUT/metrics.json"

ROWS = [
    ("energy_mae", "energy MAE [eV]"),
    ("energy_rmse", "energy RMSE [eV]"),
    ("forces_mae", "force MAE [eV/A]"),
    ("forces_rmse", "force RMSE [eV/A]"),
    ("forces_ece", "force ECE"),
    ("forces_ece_isotonic", "force ECE (isotonic)"),
    ("forces_nll", "force NLL"),
    ("forces_crps", "force CRPS [eV/A]"),
    ("forces_sharpness", "force sharpness [eV/A]"),
    ("spearman", "Spearman"),
    ("energy_nll", "energy NLL"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint (BLIP, MC dropout, ensemble or deterministic)")
    parser.add_argument("--data", required=True, help="in-distribution test data with energies and forces")
    parser.add_argument("--ood", default=None, help="out-of-distribution data: adds the 'ood' section and AUROC")
    parser.add_argument("--n-samples", type=int, default=100, help="Monte Carlo samples (an ensemble uses its members)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo noise")
    parser.add_argument("--out", required=True, help="output directory for metrics.json and the PNG plots")
    parser.add_argument("--no-plots", action="store_true", help="write metrics.json only")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier evaluation in --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_compute_options(parser)


def format_table(report: dict) -> str:
    """A short text table of the report's sections (one column each)."""
    sections = [s for s in ("id_uncalibrated", "id", "ood_uncalibrated", "ood") if s in report]
    names = {s: s.replace("_uncalibrated", " (uncal.)") for s in sections}
    lines = [f"{'metric':<24}" + "".join(f"{names[s]:>16}" for s in sections)]
    for key, label in ROWS:
        values = [report[s].get(key) for s in sections]
        if all(v is None for v in values):
            continue
        lines.append(f"{label:<24}" + "".join(f"{v:>16.4g}" if v is not None else f"{'-':>16}" for v in values))
    if report.get("auroc") is not None:
        lines.append(f"AUROC id vs ood (mean std) {report['auroc']:.4f}, (max std) {report['auroc_max']:.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from blip_ase.uq.evaluate import evaluate

    report = evaluate(
        args.model, args.data, ood_path=args.ood, n_samples=args.n_samples, seed=args.seed,
        device=args.device, out_dir=args.out, plots=not args.no_plots, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    n = report["n_samples"]
    print(f"{args.model}: method {report['method']}" + (f", {n} samples" if n else ", MAP (accuracy only)"))
    print(format_table(report))
    print(f"wrote {args.out}/metrics.json" + (f" and {', '.join(report['plots'])}" if report.get("plots") else ""))
    return 0
