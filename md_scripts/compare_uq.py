"""Compare uncertainty methods on ammonia and acetylacetone: deterministic PaiNN, LLPR, MC dropout,
deep ensemble, BLIP with the shipped defaults and BLIP with the paper's settings.

    python md_scripts/compare_uq.py --out runs/compare_uq
    python md_scripts/compare_uq.py --benchmarks ammonia --methods blip \\
        --variant no_contrastive='{"contrastive": {"weight": 0}}' --out runs/ablation

Every method is trained by the library's ``train`` (what ``blip train`` runs) from the
benchmark's example config (``examples/<benchmark>/config.yaml``: the shipped BLIP defaults),
then evaluated by ``blip_ase.uq.evaluate.evaluate`` (what ``blip eval`` runs) on an
in-distribution (ID) test set and an out-of-distribution (OOD) set, after calibration on the
validation set by ``calibrate`` (what ``blip calibrate`` runs). Writes ``OUT/results.json``
(every metric of every run) and ``OUT/table.md`` (mean +- std over seeds).

Data (the validation split selects the checkpoint and fits the calibration; test splits are
never used for either):

- ammonia: the 87 near-equilibrium frames of ``examples/ammonia/{train,val}.extxyz`` are
  shuffled (seed 0) into 62 training, 10 validation and 15 ID test frames;
  ``examples/ammonia/ood.extxyz`` (51 frames up to ~70 kcal/mol) is the OOD set.
- acac: ``examples/acac/acac_train_300K.extxyz`` shuffled (seed 0) into ``--acac-train``
  training and ``--acac-val`` validation frames; ``--acac-test`` frames drawn (seed 0) from
  each of ``acac_test_300K`` (ID) and ``acac_test_600K`` (OOD).

``--dev`` replaces the test sets by a development split of the training pool (see
:func:`split_data`): defaults are chosen on it, never on the test sets.

Methods: ``llpr`` = last-layer prediction rigidity fitted post hoc (``blip llpr``) on the
deterministic baseline of the same seed: covariance on its training split, scale alpha^2 on its
validation split (then calibrated like the others); ``blip`` = the example config as shipped; ``blip_paper`` = the paper's settings
(:data:`PAPER`); ``--variant NAME=JSON`` adds a BLIP run with nested config overrides (ablations)
on each of ``--variant-benchmarks``, ``--variant BENCHMARK:NAME=JSON`` on that benchmark only.
Seeds: BLIP, its variants and MC dropout use seed ``s``; the deep ensemble of seed ``s`` has
members with seeds ``N*s ... N*s + N - 1`` and the deterministic baseline of seed ``s`` is its
first member (trained alone, with the same seed, when the ensemble is not asked for). Runs use one
torch thread each, ``--jobs`` at a time.

``--merge DIR [DIR ...]`` trains nothing: it joins the ``results.json`` of earlier runs made with
the same protocol (epochs, frames, samples, ensemble size; refused otherwise) into ``OUT``, keeping
the first run of each benchmark, method and seed, so that a long comparison can run in parts
(e.g. one seed or one method at a time) and a later variant can join it:

    python md_scripts/compare_uq.py --merge runs/part1 runs/part2 --out runs/all
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
METHODS = ["deterministic", "llpr", "mc_dropout", "ensemble", "blip", "blip_paper"]
BENCHMARKS = ["ammonia", "acac"]
PAPER = {  # BLIP as in the paper (appendix C.2): lambda 10, p0 0.5, element-only beta, MAP selection
    "bayes": {"p0": 0.5, "kl_weight": 10.0, "p_max": 0.8, "n_rbf": 20, "neighbourhood": False},
    "optim": {"posterior_lr": None},
    "contrastive": {"weight": 0.0},
    "kl_warmup_epochs": 0,
    "select_by": "val_loss",
}
METRICS = [  # key, header, factor (eV -> meV), format
    ("energy_mae", "E MAE [meV]", 1000.0, ".1f"),
    ("forces_mae", "F MAE [meV/Å]", 1000.0, ".1f"),
    ("forces_ece", "F ECE", 1.0, ".3f"),
    ("spearman", "Spearman", 1.0, ".3f"),
    ("forces_nll", "F NLL", 1.0, ".2f"),
]


def _write(path: Path, frames: list) -> Path:
    from ase.io import write

    write(path, frames, format="extxyz")
    return path


def _energy(atoms) -> float:
    return float(atoms.get_potential_energy())


def split_data(benchmark: str, out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Write the benchmark's train/val/test/ood files into ``out`` and return their paths.

    With ``args.dev`` the split is the development split that chooses defaults, made from the
    training pool only (the final test sets are never read): random held-out frames are the ID
    test; the OOD set is ``examples/ammonia/dev_ood.extxyz`` (distorted training-pool geometries
    labelled with PySCF, see ``make_dev_ood.py``) for ammonia and the held-out frames of highest
    energy for acac.
    """
    from ase.io import read

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if benchmark == "ammonia":
        near = read(EXAMPLES / "ammonia" / "train.extxyz", ":") + read(EXAMPLES / "ammonia" / "val.extxyz", ":")
        order = rng.permutation(len(near))
        if args.dev:  # the 72 non-test frames: 52 train, 10 val, 10 ID; PySCF-labelled OOD
            pool = np.random.default_rng(1).permutation(order[:72])
            parts = {"train": pool[:52], "val": pool[52:62], "test": pool[62:]}
        else:
            parts = {"train": order[:62], "val": order[62:72], "test": order[72:]}
        paths = {name: _write(out / f"{name}.extxyz", [near[k] for k in idx]) for name, idx in parts.items()}
        return paths | {"ood": EXAMPLES / "ammonia" / ("dev_ood.extxyz" if args.dev else "ood.extxyz")}
    acac = EXAMPLES / "acac"
    train = read(acac / "acac_train_300K.extxyz", ":")
    order = rng.permutation(len(train))
    n_train, n_val = args.acac_train, args.acac_val
    if args.dev:  # highest-energy 40 of the pool as "shift", then 40 ID, val, train
        pool = sorted(order, key=lambda k: _energy(train[k]))
        rest = np.random.default_rng(1).permutation(pool[:-40])
        parts = {"ood": pool[-40:], "test": rest[:40], "val": rest[40:40 + n_val],
                 "train": rest[40 + n_val:40 + n_val + n_train]}
        return {name: _write(out / f"{name}.extxyz", [train[k] for k in idx]) for name, idx in parts.items()}
    paths = {"train": _write(out / "train.extxyz", [train[k] for k in order[:n_train]]),
             "val": _write(out / "val.extxyz", [train[k] for k in order[n_train:n_train + n_val]])}
    for name, file in (("test", "acac_test_300K.extxyz"), ("ood", "acac_test_600K.extxyz")):
        frames = read(acac / file, ":")
        pick = np.sort(rng.choice(len(frames), size=min(args.acac_test, len(frames)), replace=False))
        paths[name] = _write(out / f"{name}.extxyz", [frames[k] for k in pick])
    return paths


def make_jobs(benchmarks: list[str], methods: list[str], seeds: list[int], members: int,
              dropout_ps: list[float], variants: dict[str, dict], variant_benchmarks: list[str]) -> list[dict]:
    """Training jobs: benchmark, method, seed, config overrides; longest first."""
    jobs = []
    for b in benchmarks:
        extra = {name.partition(":")[2] or name: overrides for name, overrides in variants.items()
                 if name.partition(":")[0] == b or (":" not in name and b in variant_benchmarks)}
        for s in seeds:
            llpr = "llpr" in methods
            if "ensemble" in methods:
                jobs.append({"benchmark": b, "method": "ensemble", "seed": s, "train_seed": members * s,
                             "overrides": {"deterministic": True, "ensemble": members}, "llpr": llpr})
            elif "deterministic" in methods or llpr:  # member 0 of the ensemble of seed s, alone
                jobs.append({"benchmark": b, "method": "deterministic", "seed": s, "train_seed": members * s,
                             "overrides": {"deterministic": True}, "llpr": llpr})
            if "blip" in methods:
                jobs.append({"benchmark": b, "method": "blip", "seed": s, "train_seed": s, "overrides": {}})
            if "blip_paper" in methods:
                jobs.append({"benchmark": b, "method": "blip_paper", "seed": s, "train_seed": s, "overrides": PAPER})
            for name, overrides in extra.items():
                jobs.append({"benchmark": b, "method": f"blip_{name}", "seed": s, "train_seed": s,
                             "overrides": overrides})
            if "mc_dropout" in methods:
                for p in dropout_ps:
                    jobs.append({"benchmark": b, "method": f"mc_dropout_p{p:g}", "seed": s, "train_seed": s,
                                 "overrides": {"bayes": {"method": "mc_dropout", "dropout_p": p}}})
    return jobs


def run_job(job: dict, data: dict[str, Path], out: Path, epochs: dict[str, int | None], n_samples: int,
            power: bool = False, structure: bool = False) -> list[dict]:
    """Train one job (an ensemble: all its members), then calibrate (``power``: with the power-law
    map of the force variances, ``blip calibrate --power``; ``structure``: with its structure
    term, ``--structure``; on ``data["val"]`` plus any ``data["calibration_extra"]`` files) and
    evaluate what it yields."""
    import torch

    torch.set_num_threads(1)
    from blip_ase.training import load_config, train, with_overrides
    from blip_ase.uq.evaluate import calibrate, evaluate
    from blip_ase.uq.llpr import llpr_checkpoint

    b = job["benchmark"]
    cfg = load_config(EXAMPLES / b / "config.yaml", progress=False, seed=job["train_seed"], epochs=epochs[b])
    cfg = with_overrides(cfg, job["overrides"])
    run_dir = out / b / "runs" / f"{job['method']}_seed{job['seed']}"
    start = time.perf_counter()
    summary = train(cfg, data["train"], data["val"], run_dir, overwrite=True)
    train_seconds = time.perf_counter() - start
    models = [(job["method"], run_dir / "model.pt")]
    if job["method"] == "ensemble":
        models = [("ensemble", run_dir / "model.pt"), ("deterministic", run_dir / "member_0" / "model.pt")]
    if job.get("llpr"):  # post hoc on the deterministic baseline: covariance on train, alpha^2 on val
        det = models[-1][1]
        start = time.perf_counter()
        fit = llpr_checkpoint(det, data["train"], data["val"], det.with_name("llpr.pt"), overwrite=True)
        models.append(("llpr", det.with_name("llpr.pt")))
        llpr_fit = fit | {"seconds": time.perf_counter() - start}
    results = []
    for method, path in models:
        row = {"benchmark": b, "method": method, "seed": job["seed"], "checkpoint": str(path),
               "train_seconds": train_seconds, "best_epoch": summary.get("best_epoch"), "overrides": job["overrides"]}
        if method == "llpr":
            row["llpr_fit"] = llpr_fit
        if method == "deterministic":
            row["metrics"] = evaluate(path, data["test"], ood_path=data["ood"], n_samples=n_samples, seed=0)
        else:
            calibrated = path.with_name(f"{path.stem}_calibrated.pt")
            fit = calibrate(path, [data["val"], *data.get("calibration_extra", [])], calibrated,
                            n_samples=n_samples, seed=1, overwrite=True, power=power, structure=structure)
            row["calibration"], row["val"] = fit["calibration"], fit["after"]  # val: what selects defaults
            row["metrics"] = evaluate(calibrated, data["test"], ood_path=data["ood"], n_samples=n_samples, seed=0)
        results.append(row)
        print(f"done {b} {method} seed {job['seed']} ({train_seconds:.0f} s training)", flush=True)
    return results


def _cell(values: list[float | None], factor: float, fmt: str) -> str:
    vals = np.array([v for v in values if v is not None], dtype=float) * factor
    if not vals.size:
        return "–"
    if vals.size == 1:  # no spread to show (e.g. a method run for one seed of a merged table)
        return f"{vals[0]:{fmt}} (1 seed)"
    return f"{vals.mean():{fmt}} ± {vals.std(ddof=1):{fmt}}"


ORDER = ["deterministic", "llpr", "mc_dropout", "ensemble", "blip_paper", "blip"]


def _sort_key(name: str) -> tuple:
    base = name.split("_p")[0] if name.startswith("mc_dropout") else name
    return (ORDER.index(base) if base in ORDER else len(ORDER), name)


def _label(method: str, members: int) -> str:
    if method.startswith("mc_dropout_p"):
        return f"MC dropout (p = {method.removeprefix('mc_dropout_p')})"
    fixed = {"deterministic": "Deterministic PaiNN", "llpr": "LLPR (post hoc on the deterministic PaiNN)",
             "ensemble": f"Deep ensemble ({members})",
             "blip": "**BLIP (shipped defaults)**", "blip_paper": "BLIP (paper settings)"}
    return fixed.get(method, f"BLIP, {method.removeprefix('blip_')}")


def coefficient_cells(ms: list[dict]) -> list[str]:
    """Mean alpha (edges) and beta (nodes) over layers, ID and OOD, mean over seeds."""
    cells = []
    for kind in ("edge", "node"):
        for section in ("id", "ood"):
            vals = [np.mean(m["coefficients"][section][kind]["mean"]) for m in ms
                    if m.get("coefficients") and m["coefficients"][section][kind]["mean"]]
            cells.append(f"{np.mean(vals):.3g}" if vals else "–")
    return cells


def make_table(rows: list[dict], *, members: int, caption: str, extra: bool = False) -> str:
    """Markdown tables of mean +- std over seeds: OOD, ID, after calibration, alpha/beta."""
    names = sorted({r["method"] for r in rows}, key=_sort_key)
    by = {n: [r["metrics"] for r in rows if r["method"] == n] for n in names}
    n_id, n_ood = (rows[0]["metrics"][s]["n_structures"] for s in ("id", "ood"))

    def table(section: str, extra: list[tuple[str, str]]) -> list[str]:
        head = [h for _, h, _, _ in METRICS] + [h for _, h in extra]
        lines = ["| Method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for n in names:
            sections = [m.get(f"{section}_uncalibrated", m[section]) for m in by[n]]
            cells = [_cell([sec[k] for sec in sections], f, fmt) for k, _, f, fmt in METRICS]
            cells += [_cell([m[k] for m in by[n]], 1.0, ".3f") for k, _ in extra]
            lines.append(f"| {_label(n, members)} | " + " | ".join(cells) + " |")
        return lines

    out = [caption, "", f"**Out-of-distribution ({n_ood} structures)**, uncalibrated", ""]
    out += table("ood", [("auroc", "AUROC")])
    out += ["", f"**In-distribution test ({n_id} structures)**, uncalibrated", ""]
    out += table("id", [])
    fitted_on = "the validation set" + (" and the `--calibrate-extra` frames" if extra else "")
    out += ["", f"**After calibration on {fitted_on}** (`blip calibrate`; power gamma: with `--power`; "
            "structure delta: with `--structure`)", ""]
    out += ["| Method | force scale | power gamma | structure delta | ID F ECE | ID F NLL | OOD F ECE | OOD F NLL |",
            "|---|---|---|---|---|---|---|---|"]
    for n in names:
        cal = [r for r in rows if r["method"] == n and "calibration" in r]
        if cal:
            ms = [r["metrics"] for r in cal]
            cells = [_cell([r["calibration"]["forces"] for r in cal], 1.0, ".2f")]
            cells += [_cell([(r["calibration"].get("forces_power") or {}).get(k) for r in cal], 1.0, ".2f")
                      for k in ("gamma", "delta")]
            cells += [_cell([m[s][k] for m in ms], 1.0, fmt) for s in ("id", "ood")
                      for k, fmt in (("forces_ece", ".3f"), ("forces_nll", ".2f"))]
            out.append(f"| {_label(n, members)} | " + " | ".join(cells) + " |")
    out += ["", "**Noise coefficients** (mean over edges / nodes and layers, mean over seeds)", ""]
    out += ["| Method | alpha ID | alpha OOD | beta ID | beta OOD |", "|---|---|---|---|---|"]
    for n in names:
        if n.startswith("blip"):
            out.append(f"| {_label(n, members)} | " + " | ".join(coefficient_cells(by[n])) + " |")
    return "\n".join(out) + "\n"


def parse_variants(items: list[str]) -> dict[str, dict]:
    """``NAME=JSON`` or ``BENCHMARK:NAME=JSON`` (that benchmark only) -> {name: overrides}."""
    variants = {}
    for item in items:
        name, sep, text = item.partition("=")
        bench, colon, short = name.rpartition(":")
        if not sep or not short or (colon and bench not in BENCHMARKS):
            raise SystemExit(f"--variant needs NAME=JSON or BENCHMARK:NAME=JSON (BENCHMARK {' or '.join(BENCHMARKS)}), "
                             f"got {item!r}")
        try:
            variants[name] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--variant {name}: not JSON ({exc}): {text!r}") from None
    return variants


def check_variants(variants: dict[str, dict], benchmarks: list[str], variant_benchmarks: list[str],
                   methods: list[str]) -> None:
    """Refuse, before any work, a variant that would not run (its benchmark is not compared) or
    whose rows would merge with another run's (two variants, or a variant and a method, of one
    name on one benchmark)."""
    for b in benchmarks:
        names = [name.rpartition(":")[2] for name in variants
                 if name.rpartition(":")[0] == b or (":" not in name and b in variant_benchmarks)]
        taken = [n for n in names if names.count(n) > 1 or f"blip_{n}" in methods]
        if taken:
            raise SystemExit(f"--variant {taken[0]!r} names two runs on {b} (another variant or a method)")
    for name in variants:
        bench = name.rpartition(":")[0]
        if bench and bench not in benchmarks:
            raise SystemExit(f"--variant {name}: {bench} is not among --benchmarks {benchmarks}")


PROTOCOL = ["epochs", "acac_epochs", "members", "n_samples", "acac_train", "acac_val", "acac_test", "dev"]


def merge_results(dirs: list[Path]) -> tuple[dict, list[dict]]:
    """The runs of ``DIR/results.json`` for each of ``dirs``, as one results dict (the first
    run of each benchmark, method and seed is kept), and each source's directory, command and wall time.

    Raises:
        SystemExit: the sources differ in a setting of :data:`PROTOCOL`.
    """
    loaded = [(d, json.loads((d / "results.json").read_text())) for d in dirs]
    first = loaded[0][1]["args"]
    rows, seen, sources = [], set(), []
    for d, res in loaded:
        differ = [k for k in PROTOCOL if res["args"].get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"{d} ran another protocol than {dirs[0]}: {differ}")
        sources.append({"dir": str(d), "command": res.get("command", f"(see {d}/table.md)"),
                        "wall_seconds": res["wall_seconds"]})
        for row in res["runs"]:
            key = (row["benchmark"], row["method"], row["seed"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    args = first | {"benchmarks": sorted({r["benchmark"] for r in rows}), "seeds": sorted({r["seed"] for r in rows})}
    return {"args": args, "wall_seconds": sum(s["wall_seconds"] for s in sources), "runs": rows}, sources


def write_tables(out: Path, rows: list[dict], args: dict, produced: str) -> str:
    """Write and return ``out/table.md``: a caption (``produced`` and the protocol) and one
    :func:`make_table` per benchmark of ``args``."""
    tables = [(f"{produced} on 2 CPU cores ({args['jobs']} runs at a time, "
              f"one torch thread each); mean ± std over seeds {args['seeds']}; {args['n_samples']} Monte Carlo samples "
              f"(ensemble: its {args['members']} members). Forces per component; ECE, NLL (nats, eV/Å) and Spearman "
              f"as in DESIGN.md; AUROC separates ID test from OOD structures by the mean per-atom force std. "
              f"LLPR's \"uncalibrated\" rows include its own scale alpha^2, fitted on the validation split.\n")]
    if args["dev"]:
        tables.append("Development split (`--dev`): no test set was read. The ammonia OOD set is "
                      "`examples/ammonia/dev_ood.extxyz` (PySCF labels: its energies are on another reference, so "
                      "its E MAE is meaningless; forces agree with the data set's level to ~0.012 eV/Å).\n")
    if args.get("calibrate_extra"):
        tables.append("Calibration (`--calibrate-extra`) fitted every method on the validation split together with "
                      + ", ".join(f"`{x}`" for x in args["calibrate_extra"]) + ".\n")
    for b in args["benchmarks"]:
        n_epochs = {"ammonia": args["epochs"], "acac": args["acac_epochs"]}[b] or "the config's"
        tables.append(make_table([r for r in rows if r["benchmark"] == b], members=args["members"],
                                 caption=f"### {b} ({n_epochs} epochs)",
                                 extra=any(x.startswith(f"{b}=") for x in args.get("calibrate_extra") or [])))
    text = "\n".join(tables)
    (out / "table.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/compare_uq", help="output directory")
    parser.add_argument("--benchmarks", nargs="+", default=BENCHMARKS, choices=BENCHMARKS)
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON extra BLIP run (config overrides); BENCHMARK:NAME=JSON on one benchmark")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=None, help="override the ammonia config's epochs")
    parser.add_argument("--acac-epochs", type=int, default=None, help="override the acac config's epochs")
    parser.add_argument("--variant-benchmarks", nargs="+", default=["ammonia", "acac"],
                        help="benchmarks on which the --variant runs are made")
    parser.add_argument("--members", type=int, default=4, help="deep ensemble size")
    parser.add_argument("--dropout-p", type=float, nargs="+", default=[0.05, 0.2], help="MC dropout rates")
    parser.add_argument("--n-samples", type=int, default=100, help="Monte Carlo samples at test time")
    parser.add_argument("--acac-train", type=int, default=200, help="acac training frames")
    parser.add_argument("--acac-val", type=int, default=50, help="acac validation frames")
    parser.add_argument("--acac-test", type=int, default=200, help="acac frames drawn from each test file")
    parser.add_argument("--jobs", type=int, default=2, help="training runs in parallel (one thread each)")
    parser.add_argument("--power-calibration", action="store_true",
                        help="calibrate with the power-law map of the force variances (blip calibrate --power)")
    parser.add_argument("--structure-calibration", action="store_true",
                        help="with --power-calibration: the map's structure term too (blip calibrate --structure)")
    parser.add_argument("--calibrate-extra", action="append", default=[], metavar="BENCHMARK=FILE",
                        help="labelled frames fitted with the validation split by every method's calibration "
                             "(blip calibrate --data VAL FILE), e.g. acac=examples/acac/dev_ood_600K.extxyz")
    parser.add_argument("--dev", action="store_true",
                        help="development split from the training pool only (choose defaults with it)")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                        help="train nothing: merge the results.json of earlier runs of one protocol into OUT")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.structure_calibration and not args.power_calibration:
        parser.error("--structure-calibration needs --power-calibration (the structure term is part of the power map)")
    extra: dict[str, list[Path]] = {}
    for item in args.calibrate_extra:
        bench, sep, file = item.partition("=")
        if not sep or bench not in args.benchmarks or not Path(file).is_file():
            parser.error(f"--calibrate-extra {item!r}: expected BENCHMARK=FILE with BENCHMARK one of "
                         f"{args.benchmarks} and FILE an existing file")
        extra.setdefault(bench, []).append(Path(file))
    out = Path(args.out)
    from blip_ase.strict_json import write_json

    if args.merge:
        command = " ".join(["python", "md_scripts/" + Path(__file__).name, *argv])
        merged, sources = merge_results([Path(d) for d in args.merge])
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", merged | {"command": command, "merged_from": sources})
        wall = merged["wall_seconds"]
        listed = "; ".join(f"`{s['command']}` ({s['wall_seconds'] / 60:.0f} min)" for s in sources)
        print(write_tables(out, merged["runs"], merged["args"],
                           f"Merged by `{command}` from {len(sources)} runs ({wall / 60:.0f} min in all): {listed}"))
        return 0
    import blip_ase.training  # noqa: F401  # import once here, so the forked workers share it
    import blip_ase.uq.evaluate  # noqa: F401

    variants = parse_variants(args.variant)
    check_variants(variants, args.benchmarks, args.variant_benchmarks, args.methods)
    data = {b: split_data(b, out / b / "data", args) | {"calibration_extra": extra.get(b, [])}
            for b in args.benchmarks}
    jobs = make_jobs(args.benchmarks, args.methods, args.seeds, args.members, args.dropout_p,
                     variants, args.variant_benchmarks)
    epochs = {"ammonia": args.epochs, "acac": args.acac_epochs}
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_job, job, data[job["benchmark"]], out, epochs, args.n_samples,
                               args.power_calibration, args.structure_calibration) for job in jobs]
        rows = [row for f in futures for row in f.result()]
    wall = time.perf_counter() - start
    command = " ".join(["python", "md_scripts/" + Path(__file__).name, *argv])
    write_json(out / "results.json", {"args": vars(args), "command": command, "wall_seconds": wall, "runs": rows})
    print(write_tables(out, rows, vars(args), f"Produced by `{command}` in {wall / 60:.0f} min"))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
