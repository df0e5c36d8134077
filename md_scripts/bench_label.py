#!/usr/bin/env python
"""Speed-up of parallel labelling: N frames on N worker processes against the same frames on one.

Labels ``--frames`` ammonia geometries (the OOD split of ``examples/ammonia``, positions only)
with the PySCF oracle of ``blip learn`` (``--method``/``--basis``, default B3LYP/6-31G*), first
on one worker (in this process), then on ``--workers`` spawned processes with one thread each,
through the loop's own :func:`blip_ase.active.oracle.label_frames`. Wall times include starting
the workers. Prints one JSON object; ``speedup`` = one-worker wall time / N-worker wall time,
from this one run (run it alone on the machine: the workers share its cores)::

    python md_scripts/bench_label.py --workers 2 --frames 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ase.io import read

from blip_ase.active.config import OracleConfig
from blip_ase.active.oracle import default_workers, label_frames

ROOT = Path(__file__).resolve().parents[1]


def timed(frames, oracle: OracleConfig, workers: int) -> tuple[float, dict]:
    labels = {}
    start = time.perf_counter()
    label_frames(frames, oracle, labels.__setitem__, workers=workers)
    return time.perf_counter() - start, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--frames", type=int, default=None, help="frames to label (default: 4 per worker)")
    parser.add_argument("--method", default="b3lyp")
    parser.add_argument("--basis", default="6-31g*")
    args = parser.parse_args()
    n = args.frames or 4 * args.workers
    frames = read(ROOT / "examples" / "ammonia" / "ood.extxyz", f":{n}")
    oracle = OracleConfig(kind="pyscf", method=args.method, basis=args.basis)
    one, serial = timed(frames, oracle, 1)
    many, parallel = timed(frames, oracle, args.workers)
    same = all(np.allclose(serial[k].forces, parallel[k].forces, atol=1e-6) for k in serial)
    print(json.dumps({
        "oracle": oracle.name, "frames": len(frames), "workers": args.workers, "cores": default_workers(),
        "seconds_1_worker": round(one, 2), f"seconds_{args.workers}_workers": round(many, 2),
        "speedup": round(one / many, 2), "failures": sum(bool(lab.error) for lab in parallel.values()),
        "same_labels": bool(same),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
