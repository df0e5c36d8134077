"""Compare uncertainty methods on ammonia: deterministic PaiNN, MC dropout, deep ensemble, BLIP.

    python md_scripts/compare_uq.py --out runs/compare_uq

Every method is trained by the library's ``train`` (what ``blip train`` runs) from
``examples/ammonia/config.yaml`` on the near-equilibrium split, with several seeds, then
evaluated by ``blip_ase.uq.evaluate.evaluate`` (what ``blip eval`` runs) on a held-out
near-equilibrium test set (ID) and on the out-of-distribution split, and calibrated on the
validation set by ``calibrate`` (what ``blip calibrate`` runs). Writes ``OUT/results.json`` (all
metrics of every run) and ``OUT/table.md`` (mean +- std over seeds, like the paper's Tables 2-3).

Data: the 87 near-equilibrium frames of ``examples/ammonia/{train,val}.extxyz`` are shuffled
(seed 0) into 62 training, 10 validation (checkpoint selection and calibration) and 15 ID test
frames; ``examples/ammonia/ood.extxyz`` (51 frames up to ~70 kcal/mol) is the OOD set.
Seeds: BLIP and MC dropout use seed ``s``; the deep ensemble of seed ``s`` has members with
seeds ``N*s ... N*s + N - 1`` and the deterministic baseline of seed ``s`` is its first member.
Runs use one torch thread each, ``--jobs`` at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ammonia"
METRICS = [  # key, header, factor (eV -> meV), format
    ("energy_mae", "E MAE [meV]", 1000.0, ".1f"),
    ("forces_mae", "F MAE [meV/Å]", 1000.0, ".1f"),
    ("forces_ece", "F ECE", 1.0, ".3f"),
    ("spearman", "Spearman", 1.0, ".3f"),
    ("forces_nll", "F NLL", 1.0, ".2f"),
]


def split_data(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write train/val/test (near-equilibrium) files into ``out`` and return the paths."""
    from ase.io import read, write

    near = read(EXAMPLE / "train.extxyz", ":") + read(EXAMPLE / "val.extxyz", ":")
    order = np.random.default_rng(seed).permutation(len(near))
    parts = {"train": order[:62], "val": order[62:72], "test": order[72:]}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, index in parts.items():
        paths[name] = out / f"{name}.extxyz"
        write(paths[name], [near[k] for k in index], format="extxyz")
    paths["ood"] = EXAMPLE / "ood.extxyz"
    return paths


def methods(seeds: list[int], members: int, dropout_ps: list[float]) -> list[dict]:
    """Training jobs: name, seed, config overrides; longest first."""
    jobs = [{"method": "ensemble", "seed": s, "train_seed": members * s, "deterministic": True, "ensemble": members}
            for s in seeds]
    jobs += [{"method": "blip", "seed": s, "train_seed": s} for s in seeds]
    jobs += [{"method": f"mc_dropout_p{p:g}", "seed": s, "train_seed": s, "dropout_p": p}
             for p in dropout_ps for s in seeds]
    return jobs


def run_job(job: dict, data: dict[str, Path], out: Path, epochs: int | None, n_samples: int) -> list[dict]:
    """Train one job (an ensemble: all its members), then evaluate and calibrate each model it yields."""
    import torch

    torch.set_num_threads(1)
    from blip_ase.training import load_config, train
    from blip_ase.uq.evaluate import calibrate, evaluate

    cfg = load_config(EXAMPLE / "config.yaml", progress=False, seed=job["train_seed"], epochs=epochs)
    if "dropout_p" in job:
        dropout = dataclasses.replace(cfg.bayes, method="mc_dropout", dropout_p=job["dropout_p"])
        cfg = dataclasses.replace(cfg, bayes=dropout)
    cfg = dataclasses.replace(cfg, deterministic=job.get("deterministic", False), ensemble=job.get("ensemble", 1))
    run_dir = out / "runs" / f"{job['method']}_seed{job['seed']}"
    start = time.perf_counter()
    summary = train(cfg, data["train"], data["val"], run_dir, overwrite=True)
    train_seconds = time.perf_counter() - start
    models = [(job["method"], run_dir / "model.pt")]
    if job["method"] == "ensemble":
        models.append(("deterministic", run_dir / "member_0" / "model.pt"))
    results = []
    for method, path in models:
        row = {"method": method, "seed": job["seed"], "checkpoint": str(path), "train_seconds": train_seconds,
               "best_epoch": summary.get("best_epoch")}
        if method == "deterministic":
            row["metrics"] = evaluate(path, data["test"], ood_path=data["ood"], n_samples=n_samples, seed=0)
        else:
            calibrated = path.with_name("model_calibrated.pt")
            row["calibration"] = calibrate(path, data["val"], calibrated, n_samples=n_samples, seed=1)["calibration"]
            row["metrics"] = evaluate(calibrated, data["test"], ood_path=data["ood"], n_samples=n_samples, seed=0)
        results.append(row)
        print(f"done {method} seed {job['seed']} ({train_seconds:.0f} s training)", flush=True)
    return results


def _cell(values: list[float | None], factor: float, fmt: str) -> str:
    vals = np.array([v for v in values if v is not None], dtype=float) * factor
    if not vals.size:
        return "–"
    return f"{vals.mean():{fmt}} ± {vals.std(ddof=1) if vals.size > 1 else 0.0:{fmt}}"


ORDER = ["deterministic", "mc_dropout", "ensemble", "blip"]
LABELS = {"deterministic": "Deterministic PaiNN", "ensemble": "Deep ensemble ({members})", "blip": "BLIP"}


def _label(method: str, members: int) -> str:
    if method.startswith("mc_dropout_p"):
        return f"MC dropout (p = {method.removeprefix('mc_dropout_p')})"
    return LABELS[method].format(members=members)


def make_table(rows: list[dict], *, members: int, caption: str) -> str:
    """Markdown tables of mean +- std over seeds: OOD, ID test, and before/after calibration."""
    names = sorted({r["method"] for r in rows}, key=lambda n: (ORDER.index(n.split("_p")[0]), n))
    by = {n: [r["metrics"] for r in rows if r["method"] == n] for n in names}

    def table(section: str, extra: list[tuple[str, str]]) -> list[str]:
        head = [h for _, h, _, _ in METRICS] + [h for _, h in extra]
        lines = ["| Method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for n in names:
            # uncalibrated numbers: a calibrated checkpoint reports them under "<section>_uncalibrated"
            sections = [m.get(f"{section}_uncalibrated", m[section]) for m in by[n]]
            cells = [_cell([sec[k] for sec in sections], f, fmt) for k, _, f, fmt in METRICS]
            cells += [_cell([m[k] for m in by[n]], 1.0, ".3f") for k, _ in extra]
            lines.append(f"| {_label(n, members)} | " + " | ".join(cells) + " |")
        return lines

    out = [caption, "", "**Out-of-distribution (51 structures)**, uncalibrated", ""]
    out += table("ood", [("auroc", "AUROC")])
    out += ["", "**In-distribution test (15 near-equilibrium structures)**, uncalibrated", ""]
    out += table("id", [])
    out += ["", "**After variance-scale calibration on the validation set** (`blip calibrate`)", ""]
    out += ["| Method | force scale | ID F ECE | ID F NLL | OOD F ECE | OOD F NLL |", "|---|---|---|---|---|---|"]
    for n in names:
        cal = [r for r in rows if r["method"] == n and "calibration" in r]
        if not cal:
            continue
        ms = [r["metrics"] for r in cal]
        cells = [_cell([r["calibration"]["forces"] for r in cal], 1.0, ".2f")]
        cells += [_cell([m[s][k] for m in ms], 1.0, fmt) for s in ("id", "ood") for k, fmt in
                  (("forces_ece", ".3f"), ("forces_nll", ".2f"))]
        out.append(f"| {_label(n, members)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/compare_uq", help="output directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=None, help="override the config's 500 epochs")
    parser.add_argument("--members", type=int, default=4, help="deep ensemble size")
    parser.add_argument("--dropout-p", type=float, nargs="+", default=[0.05, 0.2], help="MC dropout rates")
    parser.add_argument("--n-samples", type=int, default=100, help="Monte Carlo samples at test time")
    parser.add_argument("--jobs", type=int, default=2, help="training runs in parallel (one thread each)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    out = Path(args.out)
    import blip_ase.training  # noqa: F401  # import once here, so the forked workers share it
    import blip_ase.uq.evaluate  # noqa: F401

    data = split_data(out / "data")
    jobs = methods(args.seeds, args.members, args.dropout_p)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_job, job, data, out, args.epochs, args.n_samples) for job in jobs]
        rows = [row for f in futures for row in f.result()]
    wall = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"args": vars(args), "wall_seconds": wall, "runs": rows}, indent=1))
    epochs = args.epochs or 500
    caption = (
        f"Ammonia, PaiNN (F = 64, 3 interactions, cutoff 5 Å) trained from scratch on 62 near-equilibrium "
        f"structures for {epochs} epochs (Adam 1e-3, plateau schedule; 10 validation structures select the "
        f"checkpoint), mean ± std over {len(args.seeds)} seeds; {args.n_samples} Monte Carlo samples "
        f"(ensemble: its {args.members} members). Forces per component; ECE, NLL (nats, forces in eV/Å) and "
        f"Spearman as defined in DESIGN.md; AUROC separates the ID test from the OOD structures by the mean "
        f"per-atom force std. Produced by `{' '.join(['python', 'md_scripts/' + Path(__file__).name, *argv])}` "
        f"in {wall / 60:.0f} min on 2 CPU cores."
    )
    table = make_table(rows, members=args.members, caption=caption)
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
