"""Mean alpha of a trained BLIP model on its data, on a shifted set, and on rattled copies of its data.

    OMP_NUM_THREADS=1 python md_scripts/alpha_by_distortion.py CKPT --data TRAIN.extxyz \
        --shifted NAME=FILE [NAME=FILE ...] [--frames 40] [--rattle 0.05 0.1 0.2 0.3]
        [--lengths 1.2 1.6 2.6 3.5]

Per set, alpha (:func:`blip_ase.uq.coefficients.collect_coefficients`) averaged over the edges, for
every Bayesian layer and over all of them: where a shifted set sits on the scale of rattle
widths is how far from the data the inference network sees it. The rattled copies are the first
``--frames`` frames of ``--data``, every atom moved by a Gaussian of the given width (seed 0).
With ``--lengths``, a second table splits alpha (all layers) by edge length at those bounds (A),
with the edges per structure in each bin: which pairs carry the noise, and which respond.
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True, help="the model's training (or validation) frames")
    parser.add_argument("--shifted", nargs="*", default=[], metavar="NAME=FILE", help="sets to place on the scale")
    parser.add_argument("--frames", type=int, default=40, help="frames read from each file")
    parser.add_argument("--rattle", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.3], help="rattle widths, A")
    parser.add_argument("--lengths", type=float, nargs="*", default=[], help="edge-length bounds of a split, A")
    args = parser.parse_args(argv)
    if any(b <= a for a, b in zip(args.lengths, args.lengths[1:])) or any(x <= 0 for x in args.lengths):
        parser.error(f"--lengths must be increasing positive lengths, got {args.lengths}")
    import torch
    from ase import Atoms
    from ase.io import read

    from blip_ase.models.checkpoint import load_checkpoint
    from blip_ase.uq.coefficients import collect_coefficients

    torch.set_num_threads(1)
    model, _ = load_checkpoint(args.checkpoint, device="cpu")
    data = read(args.data, f":{args.frames}")
    sets = {"data": data}
    for item in args.shifted:
        name, _, path = item.partition("=")
        sets[name] = read(path, f":{args.frames}")
    rng = np.random.default_rng(0)
    for width in args.rattle:
        sets[f"rattle {width:g} A"] = [Atoms(a.numbers, a.positions + rng.normal(scale=width, size=(len(a), 3)),
                                             cell=a.cell, pbc=a.pbc) for a in data]  # fmt: skip
    rows = {name: collect_coefficients(model, frames) for name, frames in sets.items()}
    if rows["data"] is None:
        raise SystemExit(f"{args.checkpoint} has no inference network (alpha exists for BLIP models only)")
    n_layers = rows["data"]["edge"].shape[1]
    print("| set | alpha, all layers | " + " | ".join(f"layer {k}" for k in range(n_layers)) + " |")
    print("|---|---|" + "---|" * n_layers)
    for name, c in rows.items():
        per_layer = c["edge"].mean(axis=0)
        print(f"| {name} | {c['edge'].mean():.3f} | " + " | ".join(f"{v:.3f}" for v in per_layer) + " |")
    if args.lengths:
        bounds = [0.0, *args.lengths, np.inf]
        labels = [f"{a:g}-{b:g} A" if np.isfinite(b) else f"> {a:g} A" for a, b in zip(bounds, bounds[1:])]
        print("\n| set | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for name, c in rows.items():
            length = np.concatenate([edge_lengths(model, atoms) for atoms in sets[name]])
            alpha, cells = c["edge"].mean(axis=1), []
            for a, b in zip(bounds, bounds[1:]):
                inside = (length > a) & (length <= b)
                n = inside.sum() / len(sets[name])
                cells.append(f"{alpha[inside].mean():.3f} ({n:.0f})" if inside.any() else "–")
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def edge_lengths(model, atoms) -> np.ndarray:
    """Lengths (A) of the inference network's edges of ``atoms``, in the order of its alpha rows."""
    import torch

    with torch.no_grad():
        return model.posterior_inputs(model.build_graph(atoms)).edge_vector.norm(dim=-1).double().cpu().numpy()


if __name__ == "__main__":
    raise SystemExit(main())
