#!/usr/bin/env python
"""Learning curves of ``blip learn``: does BLIP's uncertainty make the loop cheaper than random picks?

Case ``ethanol`` (GFN2-xTB with tblite as the oracle, ``pip install "blip-ase[xtb]"``). Built once
and cached in ``OUT/data``: xTB Langevin MD of ethanol, a start set (300 K frames, ``--n-train``
training + ``--n-val`` validation), a test set of frames from 500, 750 and 1000 K (what the
high-temperature exploration reaches: OH and CH3 rotamers, stretched bonds), a start BLIP-PaiNN
trained on the start set and calibrated (shared by strategies a-c) and a deep ensemble of
``--members`` deterministic PaiNNs of the same architecture trained on the same set (strategy d).
Then, for every strategy and seed, one :func:`blip_ase.active.run_learn` in ``OUT/runs/<strategy>_s<seed>``:

- ``fps``: BLIP explores, uncertainty-weighted farthest-point sampling selects;
- ``fps_atoms``: the same with the atom-wise distance (``select.descriptor: atoms``);
- ``max_variance``: BLIP explores, the most uncertain frames are selected;
- ``random``: BLIP explores, uniform frames of the same MD pool;
- ``ensemble``: the ensemble explores (its spread is the uncertainty, ``n_samples`` = members),
  every fine-tune trains all members (``train.config.ensemble``), FPS selects.

Every run gets the same exploration (walkers, steps, temperatures, halt threshold) and label
budget per round. The flag threshold is 0, so the pool is every Monte Carlo check of every walker
(the "MD pool"), and ``stop.max_flagged_fraction: 0`` keeps the loop from stopping before
``--rounds``. No walker halts on uncertainty (``--halt``, default none): every walker runs its
steps unless the monitor's physical checks (fragmentation, atoms too close, ...) halt it, so the
exploration budget is the same MD and the strategies differ in the selection (and, for
``ensemble``, the model) only. A run directory that exists with a stopped loop is read, not run again.

Case ``nh3``: the same protocol on the README demo's shipped start (``examples/active_learning/start``:
BLIP-PaiNN, 30 + 10 B3LYP/6-31G* frames, the 30-frame OOD test set) with its PySCF oracle; the
ensemble is trained on the same 30 frames with ``start_train.yaml`` (deterministic members)::

    OMP_NUM_THREADS=1 python md_scripts/bench_learn.py --case nh3 --out runs/bench_learn_nh3 --explore-K 1000 1000 --budget 24

Recorded per round: the test force MAE of the model after the round's fine-tune, the labels
spent (cumulative, the start data included), the seconds of MD, labelling and training. The
labels to reach ``--target`` (eV/A) are those of the first model at or below it. Prints a
markdown table and writes ``OUT/results.json``::

    OMP_NUM_THREADS=1 python md_scripts/bench_learn.py --out runs/bench_learn --seeds 0 1 2 --rounds 3

Case ``nh3-demo``: the README demo (``examples/active_learning/learn.yaml``, PySCF B3LYP) as it
ships, once per seed (``seed`` of the config; ``--rounds`` overrides ``stop.max_rounds``):
rounds, DFT calls, convergence and the walkers' steps per round::

    OMP_NUM_THREADS=1 python md_scripts/bench_learn.py --case nh3-demo --out runs/nh3_demo --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("fps", "fps_atoms", "max_variance", "random", "ensemble")
TEST_TEMPERATURES_K = (500.0, 750.0, 1000.0)
PAINN = {"n_features": 32, "n_interactions": 2, "n_rbf": 16, "cutoff": 5.0}
XTB = {"kind": "ase", "calculator": "tblite.ase:TBLite", "kwargs": {"method": "GFN2-xTB", "verbosity": 0}}


def xtb_calculator():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def xtb_md(atoms, temperature_K: float, n_frames: int, *, every: int, seed: int, equilibrate: int = 200) -> list:
    """``n_frames`` frames every ``every`` steps of xTB Langevin MD (0.5 fs) after ``equilibrate`` steps,
    each with xTB energy and forces."""
    from ase import units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = atoms.copy()
    atoms.calc = xtb_calculator()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    dyn = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=temperature_K, friction=0.01 / units.fs, rng=rng)
    dyn.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frame.info = {"source": f"GFN2-xTB Langevin MD {temperature_K:.0f} K", "temperature_K": temperature_K}
        frames.append(frame)
    return frames


def train_config(epochs: int, *, members: int = 1):
    from blip_ase.training.config import TrainConfig, from_dict

    # the settings of examples/active_learning/start_train.yaml
    config = {
        "backend": "painn", "painn": PAINN, "epochs": epochs, "batch_size": 16, "seed": 0, "progress": False,
        "bayes": {"p0": 0.5, "kl_weight": 1.0e-3, "p_min": 0.0, "p_max": 0.8, "p_init": 0.01, "hidden": 32,
                  "n_hidden": 2, "n_rbf": 32},
        "contrastive": {"weight": 0.003, "rattle_A": 0.3, "stretch": 0.15},
        "loss": {"kind": "l1", "energy_weight": 0.1, "forces_weight": 1.0},
        "optim": {"optimizer": "adam", "lr": 1.0e-3, "posterior_lr": 3.0e-3, "scheduler": "plateau",
                  "plateau_factor": 0.5, "plateau_patience": 30},
    }  # fmt: skip
    if members > 1:
        config |= {"deterministic": True, "ensemble": members, "contrastive": {"weight": 0.0}}
    return from_dict(TrainConfig, config, "bench_learn train config")


def prepare(data: Path, args) -> dict:
    """The ethanol data and the two start models in ``data`` (built once; read when present)."""
    from ase.build import molecule
    from ase.io import write

    from blip_ase.training import train
    from blip_ase.uq.evaluate import calibrate

    data.mkdir(parents=True, exist_ok=True)
    seconds = {}
    mol = molecule("CH3CH2OH")
    if not (data / "test.extxyz").is_file():
        start = time.perf_counter()
        write(data / "ethanol.xyz", mol)
        frames = xtb_md(mol, 300.0, args.n_train + args.n_val, every=40, seed=0)
        write(data / "train.extxyz", frames[: args.n_train])
        write(data / "val.extxyz", frames[args.n_train :])
        test = [f for k, T in enumerate(TEST_TEMPERATURES_K) for f in xtb_md(mol, T, args.n_test, every=50, seed=k + 1)]
        write(data / "test.extxyz", test)
        seconds["xtb_data"] = time.perf_counter() - start
    for name, members in (("blip", 1), ("ensemble", args.members)):
        model = data / f"{name}.pt"
        if model.is_file():
            continue
        start = time.perf_counter()
        cfg = train_config(args.start_epochs, members=members)
        train(cfg, data / "train.extxyz", data / "val.extxyz", data / f"train_{name}", overwrite=True)
        calibrate(data / f"train_{name}" / "model.pt", data / "val.extxyz", model, n_samples=32, overwrite=True)
        seconds[f"train_{name}"] = time.perf_counter() - start
    case = {"structure": data / "ethanol.xyz", "train": data / "train.extxyz", "val": data / "val.extxyz",
            "test": data / "test.extxyz", "blip": data / "blip.pt", "ensemble": data / "ensemble.pt",
            "oracle": {**XTB, "workers": 1}}  # fmt: skip
    return describe(case, seconds)


def describe(case: dict, seconds: dict) -> dict:
    from ase.io import read

    n_start = len(read(case["train"], ":")) + len(read(case["val"], ":"))
    return {**{k: str(v) if isinstance(v, Path) else v for k, v in case.items()}, "n_start": n_start,
            "n_test": len(read(case["test"], ":")), "seconds": seconds}  # fmt: skip


def prepare_nh3(data: Path, args) -> dict:
    """The README demo's shipped start (data, BLIP model, B3LYP oracle) and a deep ensemble of
    ``--members`` deterministic PaiNNs trained on its training data (built once in ``data``)."""
    import dataclasses

    import yaml

    from blip_ase.training import load_config, train
    from blip_ase.uq.evaluate import calibrate

    example = ROOT / "examples" / "active_learning"
    start = example / "start"
    seconds = {}
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "ensemble.pt").is_file():
        begin = time.perf_counter()
        cfg = load_config(example / "start_train.yaml", progress=False)
        cfg = dataclasses.replace(cfg, deterministic=True, ensemble=args.members,
                                  contrastive=dataclasses.replace(cfg.contrastive, weight=0.0))  # fmt: skip
        train(cfg, start / "train.extxyz", start / "val.extxyz", data / "train_ensemble", overwrite=True)
        calibrate(data / "train_ensemble" / "model.pt", start / "val.extxyz", data / "ensemble.pt", n_samples=32,
                  overwrite=True)  # fmt: skip
        seconds["train_ensemble"] = time.perf_counter() - begin
    oracle = yaml.safe_load((example / "learn.yaml").read_text())["oracle"]
    case = {"structure": start / "nh3.xyz", "train": start / "train.extxyz", "val": start / "val.extxyz",
            "test": start / "ood_test.extxyz", "blip": start / "model.pt", "ensemble": data / "ensemble.pt",
            "oracle": oracle}  # fmt: skip
    return describe(case, seconds)


def learn_config(case: dict, strategy: str, seed: int, args):
    """The ``blip learn`` settings of one run (the same exploration and budget for every strategy)."""
    from blip_ase.active.config import LearnConfig
    from blip_ase.training.config import from_dict

    ensemble = strategy == "ensemble"
    config = {
        "model": str(case["ensemble" if ensemble else "blip"]),
        "train_data": str(case["train"]), "val_data": str(case["val"]), "test_data": str(case["test"]), "seed": seed,
        "explore": {
            "structures": [str(case["structure"])], "temperatures_K": list(args.explore_K), "steps": args.steps,
            "md": {"ensemble": "nvt-langevin", "timestep_fs": 0.5, "uq_interval": args.uq_interval,
                   "n_samples": args.members if ensemble else args.n_samples,
                   "thresholds": {"force_std_flag": 0.0, "force_std_halt": args.halt}},
        },
        "select": {"strategy": "fps" if ensemble or strategy == "fps_atoms" else strategy, "budget": args.budget,
                   "min_distance": 0.0, "seed": seed, "descriptor": "atoms" if strategy == "fps_atoms" else "mean"},
        "oracle": case["oracle"],
        "train": {"val_fraction": 0.25, "calibration_samples": 32,
                  "config": {"epochs": args.epochs, **({"ensemble": args.members} if ensemble else {})}},
        "stop": {"max_rounds": args.rounds, "max_flagged_fraction": 0.0},
    }  # fmt: skip
    return from_dict(LearnConfig, config, f"bench_learn {strategy} seed {seed}")


def run_once(config, out: Path) -> dict:
    """Run the loop in ``out`` (or read it when it stopped before); its rows and wall time."""
    from blip_ase.active import run_learn
    from blip_ase.active.report import labels_total
    from blip_ase.active.state import read_state

    start, timing = time.perf_counter(), out / "bench_wall.json"
    if (out / "state.json").is_file() and read_state(out).status == "stopped":
        state = read_state(out)
        wall = json.loads(timing.read_text())["wall_seconds"] if timing.is_file() else None
    else:
        state = run_learn(config, out, restart=(out / "state.json").is_file())
        wall = time.perf_counter() - start
        timing.write_text(json.dumps({"wall_seconds": wall}))
    rows = [dict(r) for r in state.rounds]
    for row, total in zip(rows, labels_total(rows, state.n_start_labels)):
        row["labels_total"] = total
    return {"rows": rows, "stopped": state.stopped, "wall_seconds": wall, "n_start": state.n_start_labels}


def curve(run: dict) -> list[tuple[int, float]]:
    """(labels spent, test force MAE of the model trained on them): the start model, then each round's."""
    rows = run["rows"]
    points = [(run["n_start"], rows[0]["test_forces_mae"])]
    for row, following in itertools.pairwise(rows):
        if row.get("labels_total") is not None and following.get("test_forces_mae") is not None:
            points.append((row["labels_total"], following["test_forces_mae"]))
    return points


def labels_to_target(points: list[tuple[int, float]], target: float) -> int | None:
    return next((n for n, mae in points if mae <= target), None)


def round_seconds(run: dict) -> list[float]:
    """Seconds of MD (test metrics included), labelling and fine-tuning of each round that trained."""
    return [sum(r.get(k) or 0.0 for k in ("seconds_md", "seconds_label", "seconds_train"))
            for r in run["rows"] if r.get("seconds_train") is not None]  # fmt: skip


def mean_std(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` (population std over the seeds); one value alone; ``-`` for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def table(runs: dict, strategies: list[str], target: float) -> str:
    """Markdown: per strategy, mean ± std over seeds of the MAE after each round, labels spent,
    labels to reach ``target`` (reached in how many seeds) and seconds per round."""
    n_points = max(len(curve(r)) for r in runs.values())
    head = ["strategy"] + [f"MAE {'start' if k == 0 else f'r{k}'} (labels)" for k in range(n_points)]
    head += [f"labels to {target} eV/A (each seed)", "s per round", "MD steps per round", "halted walkers per round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for strategy in strategies:
        mine = [r for key, r in runs.items() if key.rsplit("_s", 1)[0] == strategy]
        if not mine:
            continue
        cells = [strategy]
        for k in range(n_points):
            pts = [curve(r)[k] for r in mine if len(curve(r)) > k]
            cells.append(f"{mean_std([p[1] for p in pts])} ({mean_std([p[0] for p in pts], 0)})")
        reached = [labels_to_target(curve(r), target) for r in mine]
        last = max(curve(r)[-1][0] for r in mine)
        cells.append(", ".join(str(n) if n is not None else f">{last}" for n in reached))
        cells.append(mean_std([s for r in mine for s in round_seconds(r)], 0))
        trained = [row for r in mine for row in r["rows"] if row.get("seconds_train") is not None]
        cells.append(f"{np.mean([row['md_steps_completed'] for row in trained]):.0f}")
        cells.append(f"{np.mean([row['halted'] for row in trained]):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def demo(args) -> dict:
    """The README demo once per seed; rounds, DFT calls and convergence of each."""
    import dataclasses

    from blip_ase.active.config import load_learn_config

    base = load_learn_config(args.config)
    runs = {}
    for seed in args.seeds:
        config = dataclasses.replace(base, seed=seed)
        if args.rounds is not None:
            config = dataclasses.replace(config, stop=dataclasses.replace(config.stop, max_rounds=args.rounds))
        run = run_once(config, args.out / f"seed_{seed}")
        rows = run["rows"]
        run |= {"converged": (run["stopped"] or "").startswith("converged"),
                "rounds": sum(r.get("n_labelled") is not None for r in rows),
                "dft_calls": rows[-1]["labels_total"] - run["n_start"],
                "steps_per_round": [r["md_steps_completed"] for r in rows],
                "flagged_per_round": [r["n_flagged"] for r in rows],
                "test_mae_per_round": [r["test_forces_mae"] for r in rows]}  # fmt: skip
        runs[f"seed_{seed}"] = run
        print(f"seed {seed}: {run['stopped']}; steps {run['steps_per_round']}, DFT calls {run['dft_calls']}, "
              f"wall {run['wall_seconds']}", flush=True)  # fmt: skip
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["ethanol", "nh3", "nh3-demo"], default="ethanol")
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "active_learning" / "learn.yaml",
                        help="nh3-demo: the learn config to run (default: the README demo's)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (cached data and runs are reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=None, help="rounds of labelling (ethanol default 3)")
    parser.add_argument("--budget", type=int, default=16, help="labels per round")
    parser.add_argument("--steps", type=int, default=600, help="MD steps per walker and round")
    parser.add_argument("--explore-K", type=float, nargs="+", default=[700.0, 1000.0], help="one walker each")
    parser.add_argument("--uq-interval", type=int, default=10)
    parser.add_argument("--n-samples", type=int, default=16, help="BLIP Monte Carlo samples per check")
    parser.add_argument("--halt", type=float, default=None,
                        help="halt threshold on the max force std, eV/A (default: none; the physical checks "
                        "still halt a walker whose molecule falls apart)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=60, help="fine-tune epochs per round")
    parser.add_argument("--start-epochs", type=int, default=200, help="epochs of the ethanol start models")
    parser.add_argument("--members", type=int, default=3, help="ensemble members (strategy ensemble)")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-val", type=int, default=10)
    parser.add_argument("--n-test", type=int, default=40, help="test frames per temperature")
    parser.add_argument("--target", type=float, default=None, help="target test force MAE, eV/A "
                        "(default: 0.7 x the BLIP start model's)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if args.case != "nh3-demo" and args.target is None and set(args.strategies) <= {"ensemble"}:
        parser.error("--target is needed when only the ensemble runs (the default is 0.7 x the BLIP start model's "
                     "test MAE, which only a BLIP strategy measures)")
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
            "torch": torch.__version__, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(args).items()}}  # fmt: skip
    if args.case == "nh3-demo":
        runs = demo(args)
        (args.out / "results.json").write_text(json.dumps({**meta, "runs": runs}, indent=1))
        return 0
    args.rounds = 3 if args.rounds is None else args.rounds
    prepared = (prepare if args.case == "ethanol" else prepare_nh3)(args.out / "data", args)
    print(f"data: {prepared}", flush=True)
    runs = {}
    for seed in args.seeds:
        for strategy in args.strategies:
            key = f"{strategy}_s{seed}"
            runs[key] = run_once(learn_config(prepared, strategy, seed, args), args.out / "runs" / key)
            print(f"{key}: {curve(runs[key])} wall {runs[key]['wall_seconds']}", flush=True)
    blip_start = [r["rows"][0]["test_forces_mae"] for k, r in runs.items() if not k.startswith("ensemble")]
    target = args.target if args.target is not None else round(0.7 * float(np.mean(blip_start or [np.nan])), 3)
    text = table(runs, args.strategies, target)
    print(text)
    result = {**meta, "prepared": prepared, "target": target, "runs": runs, "table": text}
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
