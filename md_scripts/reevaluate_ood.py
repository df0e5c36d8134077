"""Evaluate the checkpoints of earlier ``compare_uq.py`` runs on another OOD set (no training).

    OMP_NUM_THREADS=1 python md_scripts/reevaluate_ood.py RUN_DIR ... [--ood FILE] [--n-samples 32] \
        [--recalibrate | --calibrate-extra FILE] [--power [--structure]]

For each run directory, each method row of its ``results.json`` is evaluated again with
:func:`blip_ase.uq.evaluate.evaluate` on the run's own ID test split and ``--ood`` (default: the
run's own OOD split), with the calibrated checkpoint where the run calibrated one (as
``compare_uq.py`` did, seed 0), and one markdown row per method gives the mean ± std over the
runs of OOD Spearman, AUROC, calibrated OOD force ECE and NLL, calibrated ID force ECE and OOD
force MAE. Used to read development models on a new development OOD set
(``examples/acac/make_dev_ood.py``).

With ``--recalibrate`` every method's uncalibrated checkpoint is calibrated again (as
``compare_uq.py`` does: seed 1; ``--power`` and ``--structure`` as in ``blip calibrate``) on the
run's validation split; with ``--calibrate-extra FILE`` on it together with FILE's labelled
frames, ``blip calibrate --data VAL FILE``: calibration that also sees hotter structures. The
checkpoints go next to the originals as ``*_recalibrated.pt``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--ood", type=Path, default=None,
                        help="the OOD set (default: the run's own data/ood.extxyz, the acac test split's 600 K frames)")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--recalibrate", action="store_true", help="calibrate again on the run's validation split")
    parser.add_argument("--calibrate-extra", type=Path, default=None,
                        help="recalibrate on the run's validation split plus these labelled frames")
    parser.add_argument("--power", action="store_true", help="when recalibrating: fit the power-law map too")
    parser.add_argument("--structure", action="store_true", help="when recalibrating: with its structure term")
    args = parser.parse_args(argv)
    recalibrate = args.recalibrate or args.calibrate_extra is not None
    if (args.power or args.structure) and not recalibrate:
        parser.error("--power and --structure apply when recalibrating: add --recalibrate or --calibrate-extra")
    if args.structure and not args.power:
        parser.error("--structure needs --power (the structure term is part of the power map)")
    for path in [args.ood, args.calibrate_extra, *(run / "results.json" for run in args.runs)]:
        if path is not None and not path.is_file():
            parser.error(f"{path} does not exist")
    import torch

    from blip_ase.uq.evaluate import calibrate, evaluate

    torch.set_num_threads(1)
    table: dict[str, list[dict]] = defaultdict(list)
    for run in args.runs:
        for row in json.loads((run / "results.json").read_text())["runs"]:
            path = Path(row["checkpoint"])
            calibrated = path.with_name(f"{path.stem}_calibrated.pt")
            model = calibrated if calibrated.is_file() else path
            data = next(p.parent / "data" for p in path.parents if p.name == "runs")  # the run's own splits
            test = data / "test.extxyz"
            ood = args.ood or data / "ood.extxyz"
            if recalibrate and row["method"] != "deterministic":
                model = path.with_name(f"{path.stem}_recalibrated.pt")
                extra = [] if args.calibrate_extra is None else [args.calibrate_extra]
                calibrate(path, [data / "val.extxyz", *extra], model, n_samples=args.n_samples, seed=1,
                          overwrite=True, power=args.power, structure=args.structure)
            m = evaluate(model, test, ood_path=ood, n_samples=args.n_samples, seed=0)
            table[row["method"]].append(m)
            spearman, auroc = m["ood"].get("spearman"), m.get("auroc")
            print(f"{run.name} {row['method']}: Spearman {spearman}, AUROC {auroc}", flush=True)
    print("\n| method (runs) | OOD Spearman | AUROC | OOD F ECE cal. | OOD F NLL cal. | ID F ECE cal. "
          "| OOD F MAE [meV/Å] | alpha ID / OOD |")
    print("|---|---|---|---|---|---|---|---|")
    for method, rows in table.items():
        def cell(values, fmt=".3f", factor=1.0):
            v = np.array([x for x in values if x is not None], float) * factor
            return "–" if not v.size else f"{v.mean():{fmt}} ± {v.std(ddof=1) if v.size > 1 else 0.0:{fmt}}"

        alpha = [r.get("coefficients") or {} for r in rows]
        has = all("ood" in a and a["ood"].get("edge") for a in alpha)
        a_id = np.mean([np.mean(a["id"]["edge"]["mean"]) for a in alpha]) if has else None
        a_ood = np.mean([np.mean(a["ood"]["edge"]["mean"]) for a in alpha]) if has else None
        cells = [cell([r["ood"].get("spearman") for r in rows]), cell([r.get("auroc") for r in rows]),
                 cell([r["ood"]["forces_ece"] for r in rows]), cell([r["ood"]["forces_nll"] for r in rows], ".2f"),
                 cell([r["id"].get("forces_ece") for r in rows]),
                 cell([r["ood"]["forces_mae"] for r in rows], ".1f", 1000.0),
                 "–" if a_id is None else f"{a_id:.3f} / {a_ood:.3f}"]  # fmt: skip
        print(f"| {method} ({len(rows)}) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
