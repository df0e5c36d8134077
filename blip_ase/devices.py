"""Torch devices: the one place that turns a device option into a ``torch.device``.

An unavailable device (``cuda`` with a CPU build of torch, ``cuda:3`` on a machine with one GPU,
``mps`` off macOS) is one clear ``ValueError`` before any work, not torch's traceback from deep
inside the first tensor transfer.
"""

from __future__ import annotations

import torch


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device``; None picks CUDA when available, else CPU.

    Raises:
        ValueError: ``device`` is not a device name, or this machine or torch build lacks it.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown torch device {device!r} (e.g. cpu, cuda, cuda:1)") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
            raise ValueError(
                f"device {str(device)!r} is not available: torch {torch.__version__} is {build} and sees no GPU; "
                "use --device cpu"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} is not available: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return resolved
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} is not available on this machine; use --device cpu")
    return resolved
