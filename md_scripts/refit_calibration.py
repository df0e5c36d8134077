"""Refit the calibration of every model of a ``compare_uq.py --dev --benchmarks ammonia`` run with
a plain variance scale (``blip calibrate``), the power-law map (``blip calibrate --power``) and the
power law plus isotonic recalibration, and report the force ECE and NLL on the dev ID and OOD sets.

    python md_scripts/refit_calibration.py runs/RUN [METHOD_PREFIX ...]

The validation predictions use seed 1 and the ID/OOD predictions seed 0, as ``compare_uq.py``, so
the ``scale`` numbers equal those of its ``table.md``. Writes ``runs/RUN/calibration_maps.json``
(per run: ``{split}_{map}_ece``, ``{split}_{map}_nll``, the fitted ``gamma`` and ``scale``, the
uncalibrated ``{split}_mae`` and ``{split}_spearman``). LLPR models are the ``llpr.pt`` files of
the deterministic runs; deterministic models have no variances and are skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def refit(run: Path, prefixes: list[str], n_samples: int = 32) -> dict:
    import torch

    from blip_ase.models.checkpoint import load_checkpoint
    from blip_ase.uq.evaluate import compute_metrics, fit_calibration, predict, read_labelled

    torch.set_num_threads(1)
    runs = run / "ammonia" / "runs"
    models = {p.parent.name: p for p in sorted(runs.glob("*_seed*/model.pt")) if not p.parent.name.startswith("deter")}
    models |= {
        p.parent.name.replace("deterministic", "llpr"): p for p in sorted(runs.glob("deterministic_seed*/llpr.pt"))
    }
    sets = {"val": (run / "ammonia" / "data" / "val.extxyz", 1), "id": (run / "ammonia" / "data" / "test.extxyz", 0),
            "ood": (ROOT / "examples" / "ammonia" / "dev_ood.extxyz", 0)}  # fmt: skip
    data = {name: read_labelled(path) for name, (path, _) in sets.items()}
    out = {}
    for name, path in models.items():
        if prefixes and not any(name.startswith(p) for p in prefixes):
            continue
        model, _ = load_checkpoint(path)
        preds = {s: predict(model, *data[s], n_samples=n_samples, seed=seed) for s, (_, seed) in sets.items()}
        maps = {"scale": fit_calibration(preds["val"]), "power": fit_calibration(preds["val"], power=True),
                "power_iso": fit_calibration(preds["val"], power=True, isotonic=True)}  # fmt: skip
        row = {"gamma": maps["power"]["forces_power"]["gamma"], "scale": maps["scale"]["forces"]}
        for split in ("id", "ood"):
            raw = compute_metrics(preds[split])
            row |= {f"{split}_mae": raw["forces_mae"], f"{split}_spearman": raw["spearman"]}
            for key, calibration in maps.items():
                metrics = compute_metrics(preds[split], calibration)
                row |= {f"{split}_{key}_ece": metrics["forces_ece"], f"{split}_{key}_nll": metrics["forces_nll"]}
            row[f"{split}_power_iso_ece_iso"] = compute_metrics(preds[split], maps["power_iso"])["forces_ece_isotonic"]
        out[name] = row
        print(name, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    return out


if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    result = refit(run_dir, sys.argv[2:])
    (run_dir / "calibration_maps.json").write_text(json.dumps(result, indent=1))
