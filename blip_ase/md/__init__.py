"""Uncertainty-monitored molecular dynamics: policy and physical checks, monitor, dynamics factory,
flagged-frame writers, the monitored run (:func:`run_md`) and batched walkers (:mod:`blip_ase.md.walkers`)."""

from blip_ase.md.config import MDConfig
from blip_ase.md.dynamics import ENSEMBLES, check_ensemble, make_dynamics, thermalize
from blip_ase.md.monitor import FrameReport, Thresholds, UncertaintyMonitor, evaluate_frame
from blip_ase.md.physics import PhysicalChecks
from blip_ase.md.policy import DEFAULT_THRESHOLDS
from blip_ase.md.run import run_md
from blip_ase.md.writers import (
    ExtXYZFrameWriter,
    FlaggedFrame,
    HDF5FrameWriter,
    HistoryCSV,
    plot_history,
    read_hdf5_frames,
    read_history,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ENSEMBLES",
    "ExtXYZFrameWriter",
    "FlaggedFrame",
    "FrameReport",
    "HDF5FrameWriter",
    "HistoryCSV",
    "MDConfig",
    "PhysicalChecks",
    "Thresholds",
    "UncertaintyMonitor",
    "check_ensemble",
    "evaluate_frame",
    "make_dynamics",
    "plot_history",
    "read_hdf5_frames",
    "read_history",
    "run_md",
    "thermalize",
]
