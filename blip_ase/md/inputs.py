"""Inputs of a monitored run, read and checked before anything is created: the model, the start
structures, and their fit to each other and to the configuration."""

from __future__ import annotations

from pathlib import Path

from ase import Atoms
from ase.data import chemical_symbols

from blip_ase.data.readers import read_frames, split_spec
from blip_ase.md.config import MDConfig
from blip_ase.md.dynamics import check_ensemble


def model_path(config: MDConfig) -> Path:
    """The checkpoint of the run: ``config.model`` or the shipped ammonia model."""
    from blip_ase.assets import ammonia_model

    return ammonia_model() if config.model is None else Path(config.model)


def structure_path(config: MDConfig) -> str:
    """The starting structure of the run (``FILE`` or ``FILE@INDEX``): ``config.structure`` or the shipped NH3."""
    from blip_ase.assets import ammonia_structure

    return str(ammonia_structure()) if config.structure is None else str(config.structure)


def read_structure(spec: str | Path) -> Atoms:
    """One frame of a structure file: ``FILE`` (first frame) or ``FILE@INDEX`` (e.g. ``md.traj@-1``).

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, no atoms, or several frames picked;
            the file is named.
    """
    path, index = split_spec(spec, default_index="0")
    frames = read_frames(path, index, any_format=True, what="structure file")
    if len(frames) != 1:
        raise ValueError(f"{spec} picks {len(frames)} frames of {path}; one start structure is needed")
    return frames[0]


def read_structures(spec: str | Path) -> list[tuple[str, Atoms]]:
    """Every frame of ``FILE`` (or the frames ``FILE@INDEX`` / ``FILE@A:B`` picks), each with a label
    (``FILE``, ``FILE@k`` or ``FILE@INDEX[k]``).

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, or no atoms; the file is named.
    """
    path, index = split_spec(spec)
    frames = read_frames(path, index, any_format=True, what="structure file")
    if len(frames) == 1 and index == ":":
        return [(str(path), frames[0])]
    if index == ":":
        return [(f"{path}@{k}", a) for k, a in enumerate(frames)]
    return [(f"{path}@{index}" + (f"[{k}]" if len(frames) > 1 else ""), a) for k, a in enumerate(frames)]


def load_calculator(config: MDConfig):
    """The run's :class:`~blip_ase.calculator.BLIPCalculator` (MAP mode) and its checkpoint path.

    Raises:
        ValueError: the checkpoint is a deterministic model (no uncertainty to monitor).
    """
    from blip_ase.calculator import BLIPCalculator

    path = model_path(config)
    calc = BLIPCalculator.from_checkpoint(
        path, mode="map", n_samples=config.n_samples, seed=config.seed, device=config.device
    )
    if not calc.model.has_uncertainty:
        raise ValueError(
            f"{path} is a deterministic model: uncertainty-monitored MD needs a BLIP model (or LLPR data: blip llpr)"
        )
    return calc, path


def check_inputs(atoms: Atoms, model, config: MDConfig, *, source: str) -> None:
    """Raise ``ValueError`` for a run that cannot work, before anything is created.

    Args:
        atoms: the starting structure, carrying the run's calculator.
        model: the run's :class:`~blip_ase.models.potential.Potential` (for its elements).
        config: the run.
        source: where ``atoms`` came from, named in the messages.
    """
    from blip_ase.data.graph import species_index, validate_atoms

    try:
        validate_atoms(atoms)
        species_index(atoms.numbers, list(model.elements))
    except ValueError as exc:
        raise ValueError(f"structure {source}: {exc}") from None
    known = [chemical_symbols[z] for z in model.elements]
    unknown = sorted(set(config.thresholds.per_element) - set(known))
    if unknown:
        raise ValueError(f"per-element threshold (--element-threshold) for {unknown}: the model knows only {known}")
    check_ensemble(atoms, config.ensemble)
