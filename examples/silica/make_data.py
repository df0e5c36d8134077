"""Small SiO2 glass snapshots from a melt-quench, labelled with BKS + Ewald (matscipy).

A CLASSICAL STAND-IN for the paper's DFT silica data set (appendix C.3): the labels come from the
van Beest-Kramer-van Santen (BKS) pair potential plus the Ewald sum of its partial charges
(q_Si = +2.4 e, q_O = -1.2 e), both as implemented in matscipy. It lets the ORB fine-tuning
pipeline run end to end without DFT; numbers obtained on it say nothing about accuracy on DFT.

Protocol: alpha-quartz 2x2x2 (72 atoms) -> Langevin melt at ``--melt-K`` -> linear quench to
``--quench-K`` (cell fixed), a snapshot every ``--interval`` steps of the quench; the snapshots
are shuffled (seeded) into ``train.extxyz`` and ``val.extxyz`` with energy (eV), forces (eV/A)
and stress (eV/A^3). BKS is unbounded at short distance (the "BKS catastrophe"): a snapshot
with a Si-O or O-O distance below ``--min-distance`` stops the run with an error.

Usage: ``python examples/silica/make_data.py --out examples/silica/data [--frames 40] [--seed 0]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.mixing import SumCalculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.spacegroup import crystal

CHARGES = {"Si": 2.4, "O": -1.2}
# BKS (Phys. Rev. Lett. 64, 1955 (1990)): A (eV), B (1/A), C (eV A^6)
BKS = {("O", "O"): (1388.7730, 2.76000, 175.0000), ("Si", "O"): (18003.7572, 4.87318, 133.5381)}


def bks_ewald_calculator(cutoff: float = 5.5, accuracy: float = 1e-5):
    """matscipy BKS pair potential + Ewald summation (charges from ``atoms.arrays['charge']``).

    The Ewald parameters are given explicitly (splitting 0.6 / A, erfc(0.6 * 5.5) = 3e-6;
    reciprocal cutoff 4 / A with up to 8 wave vectors per direction, enough for the ~10 A cells
    here): matscipy 1.3.1 estimates them with ``np.int``, which NumPy 2 removed.
    """
    from matscipy.calculators.ewald import Ewald
    from matscipy.calculators.pair_potential.calculator import BeestKramerSanten, PairPotential

    pair = PairPotential({(8, 8): BeestKramerSanten(*BKS[("O", "O")], cutoff), (14, 8): BeestKramerSanten(*BKS[("Si", "O")], cutoff)})
    ewald = Ewald()
    ewald.set(accuracy=accuracy, cutoff=cutoff, verbose=False, kspace={"alpha": 0.6, "nbk_c": [8, 8, 8], "cutoff": 4.0})
    return SumCalculator([pair, ewald])


def alpha_quartz(repeat: int = 2) -> Atoms:
    """alpha-quartz (P3_1 21, a = 4.916 A, c = 5.405 A), ``repeat`` cubed, with BKS charges."""
    atoms = crystal(
        ["Si", "O"], basis=[(0.4697, 0.0, 1.0 / 3.0), (0.4135, 0.2669, 1.0 / 3.0 - 0.1191)], spacegroup=152,
        cellpar=[4.916, 4.916, 5.405, 90, 90, 120],
    ) * (repeat, repeat, repeat)  # fmt: skip
    atoms.set_array("charge", np.array([CHARGES[s] for s in atoms.get_chemical_symbols()]))
    return atoms


def min_distance(atoms: Atoms) -> float:
    d = atoms.get_all_distances(mic=True)
    return float(d[np.triu_indices(len(atoms), 1)].min())


def labelled(atoms: Atoms) -> Atoms:
    """A copy without charges, with the calculator's energy, forces and stress attached."""
    frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
    frame.calc = SinglePointCalculator(
        frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress()
    )
    frame.info["source"] = "BKS + Ewald (matscipy) melt-quench; classical stand-in for DFT silica"
    return frame


def melt_quench(args: argparse.Namespace) -> list[Atoms]:
    """Snapshots of the quench (see the module docstring)."""
    rng = np.random.default_rng(args.seed)
    atoms = alpha_quartz()
    atoms.calc = bks_ewald_calculator()
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.melt_K, rng=rng)
    dyn = Langevin(atoms, args.timestep_fs * units.fs, temperature_K=args.melt_K, friction=0.02, fixcm=False, rng=rng)
    dyn.run(args.melt_steps)
    frames = []
    steps = args.frames * args.interval
    for k in range(args.frames):
        dyn.set_temperature(temperature_K=args.melt_K + (args.quench_K - args.melt_K) * (k + 1) / args.frames)
        dyn.run(args.interval)
        if min_distance(atoms) < args.min_distance:
            raise RuntimeError(f"BKS collapse after {k * args.interval} of {steps} quench steps; lower --melt-K")
        frames.append(labelled(atoms))
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/silica/data", help="output directory")
    parser.add_argument("--frames", type=int, default=40, help="snapshots taken during the quench")
    parser.add_argument("--interval", type=int, default=25, help="MD steps between snapshots")
    parser.add_argument("--melt-steps", type=int, default=500, help="MD steps at the melt temperature")
    parser.add_argument("--melt-K", type=float, default=3500.0, help="melt temperature (K)")
    parser.add_argument("--quench-K", type=float, default=300.0, help="final temperature (K)")
    parser.add_argument("--timestep-fs", type=float, default=1.0)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--min-distance", type=float, default=1.2, help="collapse check (A)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    frames = melt_quench(args)
    order = np.random.default_rng(args.seed).permutation(len(frames))
    n_val = max(1, int(round(args.val_fraction * len(frames))))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "val.extxyz", [frames[k] for k in order[:n_val]])
    write(out / "train.extxyz", [frames[k] for k in order[n_val:]])
    print(f"wrote {len(frames) - n_val} training and {n_val} validation frames to {out}")


if __name__ == "__main__":
    main()
