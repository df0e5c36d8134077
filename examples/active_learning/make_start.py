"""Starting data and model of the active-learning example, labelled by the loop's own oracle.

    python examples/active_learning/make_start.py --out my_start     # about 2 min on 2 cores

Geometries (positions only; the labels are recomputed) from ``examples/ammonia``:
30 training and 10 validation frames from the near-equilibrium split (<= 5 kcal/mol above the
minimum) and 30 frames of the OOD split as the test set. Every label comes from the oracle of
``learn.yaml`` (B3LYP/6-31G* with PySCF), the same level of theory as the loop's labels. Then a
small BLIP-PaiNN is trained from scratch on the 30 frames (``start_train.yaml``) and calibrated on
the 10 (as the loop calibrates every model it trains). Writes ``OUT/{train,val,ood_test}.extxyz``,
``OUT/nh3.xyz`` and ``OUT/model.pt``; ``OUT`` must not exist (the shipped ``start/`` is never
overwritten). To use it, point ``model``, ``train_data``, ``val_data``, ``test_data`` and
``explore.structures`` of a copy of ``learn.yaml`` at the new files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def labelled(frames: list, oracle) -> list:
    """``frames`` with the oracle's labels (a failed label stops the script: the start must be complete)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from blip_ase.active.oracle import label_frames

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


def make_start(out: Path, *, workers: int | None = None) -> float:
    """Write the starting data and model into ``out`` (created); returns the model's val force MAE."""
    import tempfile

    import yaml
    from ase.io import read, write

    from blip_ase.active.config import OracleConfig
    from blip_ase.assets import ammonia_structure
    from blip_ase.training import load_config, train
    from blip_ase.uq.evaluate import calibrate

    oracle = OracleConfig(**{**yaml.safe_load((HERE / "learn.yaml").read_text())["oracle"], "workers": workers})
    near = read(HERE.parent / "ammonia" / "train.extxyz", ":")
    ood = read(HERE.parent / "ammonia" / "ood.extxyz", ":")
    frames = labelled(near[:40] + ood[:30], oracle)
    out.mkdir(parents=True)
    write(out / "train.extxyz", frames[:30])
    write(out / "val.extxyz", frames[30:40])
    write(out / "ood_test.extxyz", frames[40:])
    write(out / "nh3.xyz", read(ammonia_structure()))
    cfg = load_config(HERE / "start_train.yaml", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, out / "train.extxyz", out / "val.extxyz", tmp)
        calibrate(Path(tmp) / "model.pt", out / "val.extxyz", out / "model.pt", n_samples=32, overwrite=True)
    return float(result["val"]["forces_mae"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Takes about 2 min on 2 cores (PySCF B3LYP/6-31G* labels).")
    parser.add_argument("--out", required=True, type=Path, help="new output directory (must not exist)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} already exists; choose a new directory (the shipped start/ is never overwritten)")
    mae = make_start(args.out)
    print(f"wrote {args.out}: starting model val force MAE {mae:.3f} eV/A")
    return 0


if __name__ == "__main__":
    sys.exit(main())
