"""Starting data and model of the active-learning example, labelled by the loop's own oracle.

    python examples/active_learning/make_start.py     # about 2 min on 2 cores

Geometries (positions only; the labels are recomputed) from ``examples/ammonia``:
30 training and 10 validation frames from the near-equilibrium split (<= 5 kcal/mol above the
minimum) and 30 frames of the OOD split as the test set. Every label comes from the oracle of
``learn.yaml`` (B3LYP/6-31G* with PySCF), the same level of theory as the loop's labels. Then a
small BLIP-PaiNN is trained from scratch on the 30 frames (``start_train.yaml``) and calibrated on
the 10 (as the loop calibrates every model it trains). Writes
``start/{train,val,ood_test}.extxyz``, ``start/nh3.xyz`` and ``start/model.pt``.
"""

import tempfile
from pathlib import Path

import yaml
from ase.io import read, write

from blip_ase.active.config import OracleConfig
from blip_ase.active.oracle import label_frames
from blip_ase.assets import ammonia_structure
from blip_ase.training import load_config, train
from blip_ase.uq.evaluate import calibrate

here = Path(__file__).parent
start = here / "start"


def labelled(frames: list) -> list:
    """``frames`` with the oracle's labels (a failed label stops the script: the start must be complete)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    oracle = OracleConfig(**yaml.safe_load((here / "learn.yaml").read_text())["oracle"])
    out = [None] * len(frames)

    def keep(k, label):
        if label.error:
            raise RuntimeError(f"frame {k}: {label.error}")
        atoms = frames[k].copy()
        atoms.calc = SinglePointCalculator(atoms, energy=label.energy, forces=label.forces)
        atoms.info = {"source": f"examples/ammonia, relabelled {oracle.name}"}
        out[k] = atoms

    label_frames(frames, oracle, keep)
    return out


def main() -> None:
    start.mkdir(exist_ok=True)
    near = read(here.parent / "ammonia" / "train.extxyz", ":")
    ood = read(here.parent / "ammonia" / "ood.extxyz", ":")
    frames = labelled(near[:40] + ood[:30])
    write(start / "train.extxyz", frames[:30])
    write(start / "val.extxyz", frames[30:40])
    write(start / "ood_test.extxyz", frames[40:])
    write(start / "nh3.xyz", read(ammonia_structure()))
    cfg = load_config(here / "start_train.yaml", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, start / "train.extxyz", start / "val.extxyz", tmp)
        calibrate(Path(tmp) / "model.pt", start / "val.extxyz", start / "model.pt", n_samples=32, overwrite=True)
    print(f"wrote {start}: starting model val force MAE {result['val']['forces_mae']:.3f} eV/A")


if __name__ == "__main__":
    main()
