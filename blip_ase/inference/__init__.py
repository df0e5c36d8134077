"""The Monte Carlo inference engine: graph cache, batched samples, noise, statistics, calibration.

:class:`~blip_ase.inference.engine.MonteCarloEngine` is what the ASE calculator, the torch-sim
model and ``blip eval`` run on; :mod:`blip_ase.inference.calibration` applies a stored
calibration; :mod:`blip_ase.inference.statistics` reduces samples to means and variances.
"""

from blip_ase.inference.engine import MonteCarloEngine, Prepared, checked_samples, configuration_key
from blip_ase.inference.statistics import map_results, monte_carlo_statistics

__all__ = [
    "MonteCarloEngine",
    "Prepared",
    "checked_samples",
    "configuration_key",
    "map_results",
    "monte_carlo_statistics",
]
