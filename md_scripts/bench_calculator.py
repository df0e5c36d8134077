"""Benchmark of BLIPCalculator on CPU: batched Monte Carlo vs MAP and vs sequential passes.

Prints one JSON object of timings (seconds per call, best of ``--repeat`` interleaved rounds)
and ratios measured in one run. Ratios use process CPU time with one torch thread (default), so
other jobs on a shared machine disturb them little; wall-clock ratios are printed alongside.
The model is the product's PaiNN (F=64, 3 interactions, cutoff 5 A, float32), randomly
initialised unless ``--checkpoint`` is given; the calculator runs with its CPU defaults.

- NH3 (4 atoms): ``mc32_over_map`` = time(MC call, S=32) / time(MAP call), target <= 4;
  ``sequential32_over_mc32`` = time(32 sequential stochastic passes) / time(MC call, S=32),
  target >= 5.
- bcc Mo 5x5x5 (250 atoms, periodic, with stress): ``mc8_over_8_single`` =
  time(MC call, S=8) / (8 * time(one stochastic pass)), target <= 1.15.
- ``posterior_share_of_mc`` (inference network / MC call) and ``neighbour_list_share_of_map``
  (``build_graph`` / MAP call) for both systems.
- ``shared_filters_saving``: 1 - time(MC call) / time(the same MC call with every sample computing
  its own radial filters, as before ``PaiNN.filters`` shared them).
- ``floor_over_map``: (deterministic pass over S copies of the graph + drawing the pass's
  Gaussian noise + inference network + neighbour list) / MAP call, the part of an MC call that
  does not depend on how the Bayesian layers are implemented.

Every calculator call is on a new configuration (positions rattled), so it includes the
neighbour list and, for MC, the inference network. A "stochastic pass" is the strict sequential
alternative: one forward and backward with one noise sample on the already built graph and
alpha/beta (so the sequential times exclude repeated neighbour lists; including them would only
favour batching more).

Usage: ``python md_scripts/bench_calculator.py [--checkpoint model.pt] [--threads 1] [--repeat 5]``
(``--checkpoint`` replaces the random NH3 model by a trained one with H and N).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from ase import Atoms
from ase.build import bulk, molecule

from blip_ase import BLIPCalculator
from blip_ase.bayes import BayesConfig, NoiseSource, bayesian_layers, input_gradients_only
from blip_ase.models import PaiNNConfig, PaiNNPotential, load_checkpoint
from blip_ase.models.painn import PaiNN


def best_times(fns: dict[str, Callable[[], object]], *, number: int, repeat: int) -> dict[str, dict[str, float]]:
    """Best over ``repeat`` rounds of the mean time per call of each function, in seconds.

    Returns ``{"cpu": ..., "wall": ...}``: process CPU time (robust when other jobs share the
    machine; with one torch thread it is the cost of the call) and wall-clock time. The
    functions are interleaved round by round, so a change of machine load affects all alike.
    """
    for fn in fns.values():
        fn()  # warm-up
    best = {kind: {name: float("inf") for name in fns} for kind in ("cpu", "wall")}
    for _ in range(repeat):
        for name, fn in fns.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(number):
                fn()
            best["cpu"][name] = min(best["cpu"][name], (time.process_time() - cpu) / number)
            best["wall"][name] = min(best["wall"][name], (time.perf_counter() - wall) / number)
    return best


def rattled(atoms: Atoms, n: int, seed: int) -> list[Atoms]:
    """``n`` copies of ``atoms`` with Gaussian noise of 0.01 A on the positions."""
    copies = []
    for k in range(n):
        a = atoms.copy()
        a.rattle(0.01, seed=seed + k)
        copies.append(a)
    return copies


def cycle(calc_fn: Callable[[Atoms], object], configs: list[Atoms]) -> Callable[[], object]:
    """A call on the next configuration each time (so no cached neighbour list is reused)."""
    state = {"k": 0}

    def call() -> object:
        state["k"] = (state["k"] + 1) % len(configs)
        return calc_fn(configs[state["k"]])

    return call


def measure(
    model: PaiNNPotential, atoms: Atoms, n_samples: int, *, number: int, repeat: int, max_batch_atoms: int | None = None
) -> dict:
    """Timings of MAP and MC calls, their parts, and ``n_samples`` sequential stochastic passes."""
    configs = rattled(atoms, 16, seed=1)
    mc = BLIPCalculator(model, n_samples=n_samples, mode="mc", device="cpu", seed=0, max_batch_atoms=max_batch_atoms)
    map_ = BLIPCalculator(model, mode="map", device="cpu", seed=0)
    stress = bool(atoms.pbc.all())
    graph = model.build_graph(atoms)
    with torch.no_grad():
        coefficients = model.coefficients(graph)
    generator = torch.Generator().manual_seed(0)

    def single_pass() -> object:
        noise = NoiseSource.spawn(generator, 1)
        with input_gradients_only():  # as the calculator evaluates
            return model(graph, coefficients=coefficients, noise=noise, compute_stress=stress)

    def posterior() -> object:
        with torch.no_grad():
            return model.coefficients(graph)

    replicas = graph.replicate(n_samples)
    rows = {"edge": graph.edge_index.shape[1], "node": len(graph.species)}
    layout = [(layer.role, rows[layer.role], layer.noise_columns) for layer in bayesian_layers(model)]  # normals

    def own_filters(atoms: Atoms) -> object:
        """An MC call whose samples compute their own radial filters (as before they were shared)."""
        shared = PaiNN.filters
        PaiNN.filters = lambda self, distance, copies: self.radial_filters(distance)
        try:
            return mc.calculate(atoms)
        finally:
            PaiNN.filters = shared

    calls = {
        "map_call": cycle(map_.calculate, configs),
        "mc_call": cycle(mc.calculate, configs),
        "mc_call_own_filters": cycle(own_filters, configs),
        "neighbour_list": cycle(model.build_graph, configs),
        "posterior": posterior,
        "single_stochastic_pass": single_pass,
        # parts of an MC call that any implementation of the method pays (see floor_over_map)
        "map_pass_over_replicas": lambda: model(replicas, compute_stress=stress),
        "noise_draw": lambda: NoiseSource.spawn(generator, n_samples).prepare(layout, dtype=model.dtype),
    }
    times = best_times(calls, number=number, repeat=repeat)
    for t in times.values():
        t["sequential_passes"] = n_samples * t["single_stochastic_pass"]
    return times


def ratios(times: dict[str, float], n_samples: int) -> dict[str, float]:
    """The benchmark's ratios from one set of timings (s)."""
    return {
        f"mc{n_samples}_over_map": times["mc_call"] / times["map_call"],
        f"sequential{n_samples}_over_mc{n_samples}": times["sequential_passes"] / times["mc_call"],
        "posterior_share_of_mc": times["posterior"] / times["mc_call"],
        # MAP pass over S copies + the noise + inference network + neighbour list, over a MAP call:
        # what an MC call costs before the Bayesian layers compute a single variance
        "floor_over_map": sum(times[k] for k in ("map_pass_over_replicas", "noise_draw", "posterior", "neighbour_list"))
        / times["map_call"],
        "neighbour_list_share_of_map": times["neighbour_list"] / times["map_call"],
        "shared_filters_saving": 1.0 - times["mc_call"] / times["mc_call_own_filters"],
    }


def rounded(obj: object) -> object:
    """Floats to 4 significant digits, recursively (for a readable report)."""
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    return float(f"{obj:.4g}") if isinstance(obj, float) else obj


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="trained H/N model for the NH3 case")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--mo-max-batch-atoms", type=int, default=None,
        help="max_batch_atoms of the Mo MC calculator (None: the CPU default, 256, i.e. one sample per pass; "
        "2000: all 8 samples in one batched pass)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config, bayes = PaiNNConfig(n_features=64, n_interactions=3, cutoff=5.0), BayesConfig(p_init=0.1)
    if args.checkpoint:
        nh3_model, _ = load_checkpoint(args.checkpoint, device="cpu")
    else:
        nh3_model = PaiNNPotential([1, 7], config, bayes)
    mo_model = PaiNNPotential([42], config, bayes)
    nh3 = measure(nh3_model.eval(), molecule("NH3"), 32, number=20, repeat=args.repeat)
    mo_atoms = bulk("Mo", "bcc", a=3.147, cubic=True) * (5, 5, 5)
    mo = measure(mo_model.eval(), mo_atoms, 8, number=2, repeat=args.repeat, max_batch_atoms=args.mo_max_batch_atoms)
    mo_batch = BLIPCalculator(mo_model, device="cpu", max_batch_atoms=args.mo_max_batch_atoms).max_batch_atoms
    report = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "dtype": str(nh3_model.dtype),
        "model": "checkpoint " + args.checkpoint if args.checkpoint else "random PaiNN F=64, 3 interactions, rc=5 A",
        "timer": "ratios from process CPU time (best of rounds); wall-clock ratios alongside",
        "nh3": {"n_atoms": 4, "n_samples": 32, "seconds": nh3, **ratios(nh3["cpu"], 32)},
        "mo": {"n_atoms": len(mo_atoms), "n_samples": 8, "max_batch_atoms": mo_batch, "seconds": mo},
    }
    report["mo"]["mc8_over_8_single"] = mo["cpu"]["mc_call"] / mo["cpu"]["sequential_passes"]
    report["mo"].update({k: v for k, v in ratios(mo["cpu"], 8).items() if "share" in k})
    report["wall_clock_ratios"] = {
        "nh3_mc32_over_map": nh3["wall"]["mc_call"] / nh3["wall"]["map_call"],
        "nh3_sequential32_over_mc32": nh3["wall"]["sequential_passes"] / nh3["wall"]["mc_call"],
        "mo_mc8_over_8_single": mo["wall"]["mc_call"] / mo["wall"]["sequential_passes"],
    }
    report["targets_met"] = bool(
        report["nh3"]["mc32_over_map"] <= 4
        and report["nh3"]["sequential32_over_mc32"] >= 5
        and report["mo"]["mc8_over_8_single"] <= 1.15
    )
    print(json.dumps(rounded(report), indent=2))
    return report


if __name__ == "__main__":
    main()
