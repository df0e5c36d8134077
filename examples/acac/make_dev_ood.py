"""Label hot acetylacetone geometries with PySCF: a 600 K-like OOD set for choosing defaults.

    pip install pyscf tblite && python examples/acac/make_dev_ood.py [--frames 20]   # ~8 min on 2 cores
    python examples/acac/make_dev_ood.py --frames 40 --starts 100 175 325 400 --first-seed 2 \
        --out examples/acac/dev_ood_600K_b.extxyz                                     # a second set

The 600 K file (``acac_test_600K.extxyz``) is a test set, and ``compare_uq.py --dev`` uses the
hottest frames of the 300 K pool as its shift, a weak one. This script makes ``dev_ood_600K.extxyz``
instead: GFN2-xTB Langevin MD at 600 K (tblite, 0.5 fs, friction 0.01/fs, 600 steps of
equilibration, then a frame every 100 steps) started from frames ``--starts`` of
``acac_train_300K.extxyz`` (start ``k`` seeded ``first_seed + k``, the frames split evenly),
each frame relabelled with PBE/def2-SVP (PySCF), the data's level of theory: on the first training
frame these forces differ from the dataset's by 0.005 eV/A (RMSE; B3LYP/6-31G*: 0.26, B3LYP/def2-SVP:
0.24), energies by 0.33 eV (another reference: use the forces only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

here = Path(__file__).parent


def hot_frames(start: Atoms, n: int, seed: int) -> list[Atoms]:
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from tblite.ase import TBLite

    atoms = Atoms(start.numbers, start.positions)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=rng)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=600, friction=0.01 / units.fs, rng=rng, fixcm=False)
    dyn.run(600)
    out = []
    for _ in range(n):
        dyn.run(100)
        out.append(Atoms(atoms.numbers, atoms.positions.copy()))
    return out


def label_all(geometries: list[Atoms], workers: int) -> list[Atoms]:
    """PBE/def2-SVP labels from ``blip learn``'s PySCF oracle (spawned workers, one thread each);
    a failed SCF is an error naming the frame."""
    from blip_ase.active.config import OracleConfig
    from blip_ase.active.oracle import label_frames

    oracle = OracleConfig(kind="pyscf", method="pbe", basis="def2-svp", workers=workers)
    frames: list[Atoms | None] = [None] * len(geometries)

    def keep(k: int, label) -> None:
        if label.error is not None:
            raise RuntimeError(f"frame {k}: {label.error}")
        atoms = Atoms(geometries[k].numbers, geometries[k].positions)
        atoms.calc = SinglePointCalculator(atoms, energy=label.energy, forces=label.forces)
        atoms.info["source"] = "make_dev_ood.py: xTB MD at 600 K, PBE/def2-SVP labels (PySCF)"
        frames[k] = atoms

    label_frames(geometries, oracle, keep)
    return frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=20, help="frames, split evenly over the starts")
    parser.add_argument("--starts", type=int, nargs="+", default=[0, 250], help="training frames the MD starts from")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first start's MD (then +1 each)")
    parser.add_argument("--workers", type=int, default=2, help="PySCF processes")
    parser.add_argument("--out", type=Path, default=here / "dev_ood_600K.extxyz")
    args = parser.parse_args(argv)
    train = read(here / "acac_train_300K.extxyz", ":")
    if args.frames < len(args.starts) or not all(0 <= k < len(train) for k in args.starts):
        parser.error(f"--frames must be >= the number of starts and --starts within 0-{len(train) - 1}")
    counts = np.diff(np.linspace(0, args.frames, len(args.starts) + 1).round().astype(int))
    geometries = [atoms for k, (start, n) in enumerate(zip(args.starts, counts))
                  for atoms in hot_frames(train[start], int(n), seed=args.first_seed + k)]  # fmt: skip
    frames = label_all(geometries, args.workers)
    write(args.out, frames, format="extxyz")
    print(f"wrote {len(frames)} frames to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
