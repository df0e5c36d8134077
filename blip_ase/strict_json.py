"""Strict JSON files: the one writer of every JSON file blip-ase produces.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON (RFC 8259):
``jq``, JavaScript and many readers reject the whole file. Here non-finite numbers become
``null`` and the file is written with ``allow_nan=False``, so a stray non-finite value can never
produce an invalid file. numpy scalars and arrays and paths are converted on the way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def to_strict(value: Any) -> Any:
    """``value`` with numpy types, tuples and paths converted and non-finite floats set to None."""
    if isinstance(value, dict):
        return {str(k): to_strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_strict(value.tolist())
    if isinstance(value, np.generic):
        return to_strict(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(data: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of ``data`` (see :func:`to_strict`)."""
    return json.dumps(to_strict(data), indent=indent, allow_nan=False)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented strict JSON atomically (temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(data) + "\n")
    tmp.replace(path)
