"""``--device`` and ``--torch-threads``: the compute options every ``blip`` subcommand shares.

``blip_ase.cli.main`` applies them before a subcommand runs, so an unavailable device is one
line (``blip md: error: device 'cuda' is not available: ...``) before anything is read or written.

The default of one torch thread and the measurements behind it are in the documentation
(``docs/performance.md``, "Threads").
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
