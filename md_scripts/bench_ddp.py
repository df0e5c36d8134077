"""Wall time per training epoch with 1 and with N processes (distributed data-parallel, torchrun).

    python md_scripts/bench_ddp.py [--nproc 1 2] [--epochs 4] [--config examples/acac/config.yaml]

Trains the example config on the acetylacetone training set (500 frames; validation: the first
``--val-frames`` of the 300 K test set) once per process count, each process with one torch
thread, started by ``python -m torch.distributed.run --standalone``. The time per epoch comes from
``log.csv`` (wall seconds since training began, written after each epoch's validation): the
mean over epochs 2..E, so start-up (imports, graphs, normalisation) and the first epoch are
excluded. Prints one JSON object: seconds per epoch for each process count and the speed-up of
each against the first. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACAC = ROOT / "examples" / "acac"


def seconds_per_epoch(nproc: int, args: argparse.Namespace, work: Path) -> float:
    """Train with ``nproc`` processes into ``work/n<nproc>``; the mean wall time of epochs 2..E."""
    out = work / f"n{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "blip_ase.cli.main", "train", str(args.config), "--train", str(args.train),
           "--val", str(work / "val.xyz"), "--out", str(out), "--epochs", str(args.epochs), "--no-progress",
           "--torch-threads", "1", "--device", "cpu"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(out / "log.csv") as fh:
        seconds = [float(row["seconds"]) for row in csv.DictReader(fh)]
    return (seconds[-1] - seconds[0]) / (len(seconds) - 1)


def main(argv: list[str] | None = None) -> int:
    from ase.io import read, write

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--config", type=Path, default=ACAC / "config.yaml")
    parser.add_argument("--train", type=Path, default=ACAC / "acac_train_300K.extxyz")
    parser.add_argument("--val-frames", type=int, default=64)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is not timed)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write(work / "val.xyz", read(ACAC / "acac_test_300K.extxyz", f":{args.val_frames}"))
        times = {n: seconds_per_epoch(n, args, work) for n in args.nproc}
    base = times[args.nproc[0]]
    print(json.dumps({
        "seconds_per_epoch": {str(n): round(t, 2) for n, t in times.items()},
        "speedup": {str(n): round(base / t, 2) for n, t in times.items()},
        "train": os.path.relpath(args.train, ROOT), "config": os.path.relpath(args.config, ROOT),
        "epochs_timed": args.epochs - 1, "cpu_cores": os.cpu_count(), "threads_per_process": 1,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
