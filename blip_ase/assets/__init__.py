"""Files shipped inside the package (found with ``importlib.resources``, so installed wheels work).

- ``ammonia_model.pt``: the shipped BLIP PaiNN model of NH3 (the default of ``blip md``),
  calibrated; how it was trained and calibrated is in ``docs/guide/train.md`` ("The shipped
  model"). This is its only copy: retrain and recalibrate into this path.
- ``ammonia_nh3.xyz``: the NH3 equilibrium geometry, the default starting structure. Data licence
  (MIT, Schwalbe-Koda et al. 2021): ``examples/ammonia/DATA_LICENSE.md``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _asset(name: str) -> Path:
    path = Path(str(files(__name__) / name))
    if not path.is_file():
        raise FileNotFoundError(f"the shipped file {path} is missing from this blip-ase installation")
    return path


def ammonia_model() -> Path:
    """Path of the shipped ammonia BLIP checkpoint."""
    return _asset("ammonia_model.pt")


def ammonia_structure() -> Path:
    """Path of the shipped NH3 starting structure (extended XYZ, Angstrom)."""
    return _asset("ammonia_nh3.xyz")
