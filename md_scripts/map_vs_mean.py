"""Force MAE of the MAP pass against the Monte Carlo mean, the prediction the calculator reports.

    OMP_NUM_THREADS=1 python md_scripts/map_vs_mean.py DATA.extxyz CKPT ... [--n-samples 32]

Per checkpoint (a BLIP model) one line: the MAE of the MAP forces (the noise switched off) and of
the mean over ``--n-samples`` Monte Carlo samples (seed 0), meV/A, on the labelled frames of DATA.
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--n-samples", type=int, default=32)
    args = parser.parse_args(argv)
    import torch

    from blip_ase.inference import MonteCarloEngine
    from blip_ase.models.checkpoint import load_checkpoint
    from blip_ase.uq.evaluate import read_labelled

    torch.set_num_threads(1)
    frames, labels = read_labelled(args.data)
    for path in args.checkpoints:
        model, _ = load_checkpoint(path, device="cpu")
        if not model.is_bayesian:
            raise SystemExit(f"{path} is deterministic: its MAP pass is its only prediction")
        engine = MonteCarloEngine(model, device="cpu", seed=0, calibration={})
        errors = {"MAP": [], "MC mean": []}
        for atoms, label in zip(frames, labels):
            prepared = engine.prepare(atoms)
            errors["MAP"].append(engine.map(prepared, stress=False)[0]["forces"] - label["forces"])
            mean = engine.monte_carlo(prepared, args.n_samples, stress=False)[0]["forces"]
            errors["MC mean"].append(mean - label["forces"])
        maes = {k: 1000 * float(np.abs(np.concatenate(v)).mean()) for k, v in errors.items()}
        print(f"{path}: force MAE, MAP {maes['MAP']:.1f}, MC mean {maes['MC mean']:.1f} meV/A", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
