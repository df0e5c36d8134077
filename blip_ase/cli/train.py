"""``blip train CONFIG.yaml --train FILE --val FILE --out DIR``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from blip_ase.cli.compute import add_compute_options
from blip_ase.strict_json import dumps

HELP = "train a BLIP (or, with --deterministic, a plain) potential; writes OUT/model.pt and OUT/log.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (unknown keys are rejected)")
    parser.add_argument("--train", required=True, help="training data: extxyz, ASE db or HDF5 with energies and forces")
    parser.add_argument("--val", required=True, help="validation data (same formats); selects the best checkpoint")
    parser.add_argument("--out", required=True, help="output directory for model.pt and log.csv")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument("--deterministic", action="store_true", help="train the same architecture without BLIP")
    parser.add_argument(
        "--ensemble", type=int, default=None, metavar="N",
        help="override the config's ensemble: train N seeds into OUT/member_<k>/ and write the ensemble OUT/model.pt",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="train one model across N processes on this machine (starts torchrun; batch_size is the global batch)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_compute_options(parser, device_help="override the config's device (cpu, cuda, cuda:1)")


def run(args: argparse.Namespace) -> int:
    from blip_ase.training import distributed, load_config, train

    overrides = {"epochs": args.epochs, "seed": args.seed, "device": args.device, "ensemble": args.ensemble}
    if args.deterministic:
        overrides["deterministic"] = True
    if args.no_progress:
        overrides["progress"] = False
    if "nproc" in getattr(args, "given_options", ()) and "WORLD_SIZE" in os.environ:
        raise ValueError("--nproc starts torchrun, but this process already runs under torchrun; leave --nproc out")
    cfg = load_config(args.config, **overrides)
    if args.nproc != 1:
        checkpoint = None if args.overwrite else os.path.join(args.out, "model.pt")
        return launch(args.nproc, args.argv, threads=args.torch_threads, batch_size=cfg.batch_size,
                      data=(args.train, args.val), checkpoint=checkpoint, device=cfg.device)  # fmt: skip
    summary = train(cfg, args.train, args.val, args.out, overwrite=args.overwrite)
    if distributed.is_main():
        print(dumps(summary))
    distributed.finish()
    return 0


def launch(
    n: int, argv: list[str], *, threads: int, batch_size: int, data: tuple[str, ...] = (),
    checkpoint: str | None = None, device: str | None = None,
) -> int:  # fmt: skip
    """``blip train ARGV`` (without ``--nproc``) in ``n`` processes started by
    ``python -m torch.distributed.run --standalone --nproc-per-node N -m blip_ase.cli.main``;
    returns torchrun's exit status. What every process would refuse is refused here first, in
    one line instead of one per process and torchrun's report.

    Raises:
        ValueError: ``n < 1``, a global ``batch_size`` that is not a multiple of ``n``, or a
            CUDA ``device`` (None: CUDA when there is a GPU) with fewer GPUs than ``n``.
        FileNotFoundError: a file of ``data`` does not exist.
        FileExistsError: ``checkpoint`` (the ``model.pt`` training would write; None with
            ``--overwrite``) exists.
    """
    import torch

    from blip_ase.devices import resolve_device
    from blip_ase.training.distributed import check_batch_size

    if n < 1:
        raise ValueError(f"--nproc must be >= 1, got {n}")
    check_batch_size(batch_size, n)
    if resolve_device(device).type == "cuda" and n > torch.cuda.device_count():
        raise ValueError(
            f"--nproc {n} on CUDA needs one GPU per process; this machine has {torch.cuda.device_count()} "
            "(--device cpu trains on CPU processes)"
        )
    for path in data:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path} does not exist")
    if checkpoint is not None and os.path.exists(checkpoint):
        raise FileExistsError(f"{checkpoint} exists; pass --overwrite to replace it")
    cores = os.cpu_count() or 1
    if n * threads > cores:
        print(f"blip train: warning: {n} processes x {threads} thread(s) on {cores} CPU core(s)", file=sys.stderr)
    drop = {k for k, a in enumerate(argv) if a == "--nproc"}
    rest = [a for k, a in enumerate(argv) if k not in drop and k - 1 not in drop and not a.startswith("--nproc=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    status = subprocess.run([*cmd, "-m", "blip_ase.cli.main", "train", *rest]).returncode
    if status:
        print(f"blip train: error: training on {n} processes failed (torchrun exit status {status})", file=sys.stderr)
    return status
