"""``--device`` and ``--torch-threads``: the compute options every ``blip`` subcommand shares.

``blip_ase.cli.main`` applies them before a subcommand runs, so an unavailable device is one
line (``blip md: error: device 'cuda' is not available: ...``) before anything is read or written.

Default threads, measured on the 2-core machine of the README's numbers (torch 2.13, CPU):
``blip eval`` of the 17 ammonia validation structures with 100 samples took 7.7 s with one thread
and 30 s with two (the machine also ran another job); issue 12 reported 2x to 13x for train, eval
and calibrate (``calibrate --isotonic``: 9 s against 120 s). The models are small, so several
threads mostly synchronise. Give a larger value on a big idle machine.
"""

from __future__ import annotations

import argparse

DEFAULT_TORCH_THREADS = 1


def add_compute_options(parser: argparse.ArgumentParser, *, device_help: str | None = None) -> None:
    """Add ``--device`` and ``--torch-threads`` (in their own argument group) to ``parser``."""
    group = parser.add_argument_group("compute")
    group.add_argument(
        "--device", default=None, help=device_help or "torch device, e.g. cpu, cuda, cuda:1; None = CUDA if available"
    )
    group.add_argument(
        "--torch-threads",
        type=int,
        default=DEFAULT_TORCH_THREADS,
        help="CPU threads of torch (measured fastest for these small models on a 2-core machine: 1)",
    )


def apply_compute_options(args: argparse.Namespace) -> None:
    """Set torch's thread count and check the device.

    Raises:
        ValueError: ``--torch-threads`` below 1, or ``--device`` unavailable (one line).
    """
    import torch

    from blip_ase.devices import resolve_device

    if args.torch_threads < 1:
        raise ValueError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    if args.device is not None:
        resolve_device(args.device)
    torch.set_num_threads(args.torch_threads)
