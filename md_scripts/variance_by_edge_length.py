"""Which edges carry a BLIP model's force variance? The Monte Carlo variance with alpha switched off beyond a length.

    OMP_NUM_THREADS=1 python md_scripts/variance_by_edge_length.py CKPT --data LABELLED.extxyz \
        [--cuts 3.5 2.6 1.6] [--n-samples 32] [--frames 40]

For each cut (and none), alpha of every edge longer than the cut is set to 0 (no noise there) and
the per-atom Monte Carlo force variance is recomputed (``--n-samples`` samples, seeds 0 ..
S-1, the same draws for every cut). Prints the mean variance, its fraction of the uncut one, and
the per-structure Spearman rank correlation of the mean variance with the mean squared error of the
mean force (as :func:`blip_ase.uq.metrics.spearman`). alpha's dependence on the positions is left
out of the sample forces here (a diagnostic of where the noise acts, not the calculator's forces).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True, help="labelled frames (forces)")
    parser.add_argument("--cuts", type=float, nargs="*", default=[3.5, 2.6, 1.6], help="edge lengths, A")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--frames", type=int, default=40, help="frames read from --data")
    args = parser.parse_args(argv)
    if args.n_samples < 2 or args.frames < 3 or any(c <= 0 for c in args.cuts):
        parser.error("--n-samples must be >= 2, --frames >= 3 (a rank correlation) and --cuts positive lengths")
    import torch
    from scipy import stats

    from blip_ase.bayes import NoiseSource
    from blip_ase.data.readers import read_frames
    from blip_ase.models.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    try:  # the data first: a bad file is named before the model is loaded
        frames = read_frames(args.data)[: args.frames]
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--data: {exc}") from None
    if len(frames) < 3:
        raise SystemExit(f"--data {args.data} has {len(frames)} frames: a rank correlation needs >= 3")
    model, _ = load_checkpoint(args.checkpoint, device="cpu")
    if getattr(model, "posterior", None) is None:
        raise SystemExit(f"{args.checkpoint} has no inference network (alpha exists for BLIP models only)")
    rows = {}
    for cut in [None, *args.cuts]:
        err2, var = [], []
        for atoms in frames:
            graph = model.build_graph(atoms)
            with torch.no_grad():
                c = model.coefficients(graph, jacobian=False)
                length = model.posterior_inputs(graph).edge_vector.norm(dim=-1)
            if cut is not None:
                c = replace(c, edge=torch.where((length > cut)[:, None], torch.zeros_like(c.edge), c.edge))
            noise = NoiseSource.from_seeds(list(range(args.n_samples)))
            forces = model(graph, coefficients=c, noise=noise)["forces"].detach().double()
            reference = torch.as_tensor(atoms.get_forces(), dtype=torch.float64)
            err2.append(float(((forces.mean(0) - reference) ** 2).sum(-1).mean()))
            var.append(float(forces.var(0).sum(-1).mean()))
        if not (np.isfinite(var).all() and np.isfinite(err2).all()):
            raise SystemExit(f"non-finite forces or variances with alpha cut at {cut}: the model or data is broken")
        rows[cut] = (np.mean(var), float(stats.spearmanr(var, err2).statistic))
    full = rows[None][0]
    print("| alpha = 0 beyond | mean variance [eV²/Å²] | fraction of all edges' | Spearman |")
    print("|---|---|---|---|")
    for cut, (v, rho) in rows.items():
        print(f"| {'(no cut)' if cut is None else f'{cut:g} A'} | {v:.3g} | {v / full:.2f} | {rho:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
