"""Benchmark of the ORB v3 backend: Monte Carlo S=8 in one batched pass vs 8 sequential passes.

System: bcc Mo 5x5x5 (250 atoms, periodic, rattled), with forces and stress. The batched pass
replicates the orb-models graph 8 times (``batch_graphs``) and reuses one inference-network
output (alpha/beta) for all samples; the sequential alternative runs 8 passes with one noise
sample each on the same graph and alpha/beta (so neither side repeats the neighbour list).
Printed: seconds per call (best of ``--repeat`` interleaved rounds, process CPU time with
``--threads`` torch threads, wall time alongside) and
``batched8_over_8_sequential = time(one pass, S=8) / time(8 passes, S=1)``.

The model is a randomly initialised ORB v3 (timings do not depend on the weights); by default
``--size small`` (the tests': latent 32, MLP 64, 2 steps), ``medium`` (latent 128, MLP 256,
3 steps) or ``default`` (orb-models' v3 size: latent 256, MLP 1024, 5 steps; about 11 GB of
memory for S=8 with stress on a CPU), all with 20 neighbours.

Usage: ``python md_scripts/bench_orb.py [--kind conservative|direct] [--size small] [--threads 1]
[--repeat 3] [--device cpu]``
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from ase.build import bulk

from blip_ase.bayes import NoiseSource
from blip_ase.models.orb import ORB_BAYES, OrbConfig, OrbPotential


SIZES = {
    "small": dict(latent_dim=32, base_mlp_hidden_dim=64, head_mlp_hidden_dim=32, num_message_passing_steps=2),
    "medium": dict(latent_dim=128, base_mlp_hidden_dim=256, head_mlp_hidden_dim=128, num_message_passing_steps=3),
    "default": {},
}


def timed(fn) -> tuple[float, float]:
    """``(cpu_seconds, wall_seconds)`` of one call of ``fn``."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["conservative", "direct"], default="conservative")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (see above)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = OrbConfig(kind=args.kind, **SIZES[args.size])
    torch.manual_seed(0)
    model = OrbPotential([42], config, ORB_BAYES).to(args.device).eval()
    atoms = bulk("Mo", "bcc", a=3.147, cubic=True) * (5, 5, 5)
    atoms.rattle(stdev=0.05, seed=0)
    graph = model.build_graph(atoms)
    with torch.no_grad():
        coefficients = model.coefficients(graph)
    s = args.samples

    def batched():
        model(graph, coefficients=coefficients, noise=NoiseSource.from_seeds(range(s), args.device), compute_stress=True)

    def sequential():
        for seed in range(s):
            model(graph, coefficients=coefficients, noise=NoiseSource.from_seeds([seed], args.device), compute_stress=True)

    def graph_and_posterior():
        g = model.build_graph(atoms)
        with torch.no_grad():
            model.coefficients(g)

    batched(), sequential()  # warm-up
    best = {"batched": (1e9, 1e9), "sequential": (1e9, 1e9), "graph_and_posterior": (1e9, 1e9)}
    for _ in range(args.repeat):
        for name, fn in (("batched", batched), ("sequential", sequential), ("graph_and_posterior", graph_and_posterior)):
            cpu, wall = timed(fn)
            best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
    report = {
        "system": f"bcc Mo 5x5x5, {len(atoms)} atoms, periodic, forces + stress",
        "model": f"ORB v3 {args.kind}, size {args.size}, random weights, float32",
        "device": args.device,
        "threads": args.threads,
        "samples": s,
        "edges": int(graph.graphs.n_edge.sum()),
        "seconds_cpu": {k: round(v[0], 4) for k, v in best.items()},
        "seconds_wall": {k: round(v[1], 4) for k, v in best.items()},
        "batched8_over_8_sequential_cpu": round(best["batched"][0] / best["sequential"][0], 3),
        "batched8_over_8_sequential_wall": round(best["batched"][1] / best["sequential"][1], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
