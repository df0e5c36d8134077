"""Label distorted ammonia geometries with PySCF: an OOD set for choosing defaults.

    pip install pyscf && python examples/ammonia/make_dev_ood.py   # about 1 min on 2 cores

The OOD split of the benchmark (``ood.extxyz``) is a test set: defaults must not be chosen on
it. This script makes a development OOD set instead, ``dev_ood.extxyz``: 40 geometries made
from the near-equilibrium frames that ``md_scripts/compare_uq.py`` never tests on (its 72-frame
training pool), each with every N-H bond stretched or compressed by an independent amount in
[-0.10, +0.25] A, every H moved sideways by up to 0.25 A (bends the molecule) and all atoms
rattled by 0.03 A: N-H 0.9-1.3 A and H-H 1.2-1.9 A, the range of ``ood.extxyz``. The
distortions differ in kind from the noise-contrastive prior's (isotropic rattle and uniform
scaling), so the set does not simply reward that prior.

Labels: BP86/def2-SVP (``xc = "b88,p86"``), the dataset's functional and basis without its D3
correction. On 3 training and 3 OOD frames of ``ammonia.extxyz`` these forces differ from the
dataset's by 0.010-0.016 eV/A (MAE): far below the models' OOD errors (about 0.5 eV/A), so the
set ranks errors and uncertainties faithfully, but too close to ID errors to judge ID accuracy.
Only forces are used (energies are on another reference).
"""

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

HARTREE_EV, BOHR_A = 27.211386245988, 0.529177210903
here = Path(__file__).parent


def distort(atoms: Atoms, rng: np.random.Generator) -> Atoms:
    """Stretch each N-H bond, move each H sideways, rattle everything."""
    out = atoms.copy()
    pos = out.positions
    n = int(np.flatnonzero(out.numbers == 7)[0])
    for h in np.flatnonzero(out.numbers == 1):
        bond = pos[h] - pos[n]
        unit = bond / np.linalg.norm(bond)
        side = rng.normal(size=3)
        side -= side.dot(unit) * unit
        side /= np.linalg.norm(side)
        pos[h] += rng.uniform(-0.10, 0.25) * unit + rng.uniform(0.0, 0.25) * side
    out.positions = pos + rng.normal(scale=0.03, size=pos.shape)
    return out


def label(atoms: Atoms) -> Atoms:
    from pyscf import dft, gto

    mol = gto.M(atom=list(zip(atoms.get_chemical_symbols(), atoms.positions)), basis="def2-svp",
                unit="Angstrom", verbose=0)
    mf = dft.RKS(mol)
    mf.xc = "b88,p86"
    energy = mf.kernel() * HARTREE_EV
    if not mf.converged:
        raise RuntimeError("SCF did not converge")
    forces = -mf.nuc_grad_method().kernel() * HARTREE_EV / BOHR_A
    bare = Atoms(atoms.numbers, atoms.positions)
    bare.calc = SinglePointCalculator(bare, energy=energy, forces=forces)
    bare.info["source"] = "make_dev_ood.py: BP86/def2-SVP (PySCF), no D3"
    return bare


def main() -> None:
    near = read(here / "train.extxyz", ":") + read(here / "val.extxyz", ":")
    pool = np.random.default_rng(0).permutation(len(near))[:72]  # compare_uq's training pool
    rng = np.random.default_rng(7)
    frames = [label(distort(near[k], rng)) for k in rng.choice(pool, size=40)]
    write(here / "dev_ood.extxyz", frames, format="extxyz")
    print(f"wrote {len(frames)} frames to {here / 'dev_ood.extxyz'}")


if __name__ == "__main__":
    main()
