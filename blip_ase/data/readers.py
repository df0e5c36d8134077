"""Read labelled structures from extxyz, ASE databases and HDF5 into ``ase.Atoms``.

Labels (eV, eV/A, eV/A^3 in ASE Voigt order) are attached as a ``SinglePointCalculator``,
as ``ase.io.read`` does for extxyz, so every reader gives the same kind of frame.

HDF5 layout (written by :func:`write_hdf5`, one file, frames concatenated):
``numbers (n_total,)``, ``positions (n_total, 3)``, ``forces (n_total, 3)``,
``n_atoms (n_frames,)``, ``energy (n_frames,)``, ``cell (n_frames, 3, 3)``,
``pbc (n_frames, 3)`` and optionally ``stress (n_frames, 6)``; attribute ``format = "blip-ase"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from blip_ase.voigt import matrix_to_voigt

EXTXYZ_SUFFIXES = {".xyz", ".extxyz"}
HDF5_SUFFIXES = {".h5", ".hdf5"}
DB_SUFFIXES = {".db", ".json"}


def split_spec(spec: str | Path, default_index: str = ":") -> tuple[Path, str]:
    """``FILE@INDEX`` -> ``(FILE, INDEX)``; a plain ``FILE`` (also one whose name holds an ``@``
    and exists) -> ``(FILE, default_index)``. ``INDEX`` as ``ase.io.read`` takes it (``-1``,
    ``0:4``, ``:``)."""
    path = Path(spec)
    name, _, tail = str(spec).rpartition("@")
    if name and not path.exists():
        return Path(name), tail
    return path, default_index


def read_frames(
    spec: str | Path, index: str | None = None, *, any_format: bool = False, what: str = "data file"
) -> list[Atoms]:
    """The frames of ``spec``: ``FILE`` or ``FILE@INDEX`` (``index`` overrides; default ``":"``,
    every frame). The one reader of the package: data sets, start structures, exports.

    Args:
        spec: the file, optionally with ``@INDEX`` (e.g. ``md_out/md.traj@-1``, ``data.extxyz@0:10``).
        index: frames to read, as ``ase.io.read`` takes them (None: the spec's, else ``":"``).
        any_format: read any format ``ase.io.read`` detects (structures: ``.traj``, ``.cif``,
            ...); otherwise only extxyz, ASE db and HDF5 (labelled data), chosen by suffix.
        what: how the file is named in messages (``"data file"``, ``"structure file"``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, unreadable content or no atoms (the message names the file).
    """
    path, spec_index = split_spec(spec)
    index = spec_index if index is None else index
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    suffix = path.suffix.lower()
    known = EXTXYZ_SUFFIXES | DB_SUFFIXES | HDF5_SUFFIXES
    if suffix not in known and not any_format:
        raise ValueError(
            f"{path}: unknown data format {suffix!r}; use extxyz ({', '.join(sorted(EXTXYZ_SUFFIXES))}), "
            f"ASE db ({', '.join(sorted(DB_SUFFIXES))}) or HDF5 ({', '.join(sorted(HDF5_SUFFIXES))})"
        )
    try:
        frames = _read(path, suffix, index)
    except Exception as exc:  # ase.io, h5py and ase.db raise many types for unreadable files
        kind = suffix.lstrip(".") if suffix in known else "any ase.io format"
        named = f"{path}" if what == "data file" else f"{what} {path}"
        raise ValueError(f"cannot read {named} as {kind} (frames {index!r}): {type(exc).__name__}: {exc}") from exc
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if not frames or any(not isinstance(a, Atoms) or len(a) == 0 for a in frames):
        raise ValueError(f"{what} {path} holds no structures (frames {index!r})")
    return frames


def _read(path: Path, suffix: str, index: str):
    from ase.io import read

    if suffix in EXTXYZ_SUFFIXES:
        return read(path, index=index, format="extxyz")
    if suffix in DB_SUFFIXES:
        from ase.db import connect

        return _pick([row.toatoms(add_additional_information=True) for row in connect(path).select()], index)
    if suffix in HDF5_SUFFIXES:
        return _pick(read_hdf5(path), index)
    return read(path, index=index)


def _pick(frames: list[Atoms], index: str) -> list[Atoms]:
    """``frames[index]`` for an ``ase.io.read`` index string."""
    from ase.io.formats import string2index

    picked = frames[string2index(index)]
    return picked if isinstance(picked, list) else [picked]


def frame_labels(atoms: Atoms, *, need_stress: bool = False, where: str = "") -> dict[str, np.ndarray | float]:
    """Reference ``energy`` (eV), ``forces`` (n, 3) and optionally ``stress`` (6,) of a frame.

    Raises:
        ValueError: a label is missing or not finite (``where`` names the frame in the message).
    """
    results = atoms.calc.results if atoms.calc is not None else {}
    labels: dict[str, np.ndarray | float] = {}
    for key, shape in (("energy", ()), ("forces", (len(atoms), 3))) + ((("stress", (6,)),) if need_stress else ()):
        value = results.get(key, atoms.info.get(key) if key != "forces" else atoms.arrays.get(key))
        if value is None:
            raise ValueError(f"{where or 'frame'} has no {key} label")
        value = np.asarray(value, dtype=float)
        if key == "stress" and value.shape == (3, 3):
            value = matrix_to_voigt(value)
        if value.shape != shape or not np.all(np.isfinite(value)):
            raise ValueError(f"{where or 'frame'} has an invalid {key} label (shape {value.shape}, expected {shape})")
        labels[key] = float(value) if key == "energy" else value
    return labels


def write_hdf5(path: str | Path, frames: list[Atoms]) -> None:
    """Write labelled frames in the layout of this module's docstring."""
    import h5py

    labels = [frame_labels(a, where=f"frame {k}") for k, a in enumerate(frames)]
    has_stress = all(a.calc is not None and "stress" in a.calc.results for a in frames)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "blip-ase"
        f["numbers"] = np.concatenate([a.numbers for a in frames])
        f["positions"] = np.concatenate([a.positions for a in frames])
        f["forces"] = np.concatenate([lab["forces"] for lab in labels])
        f["n_atoms"] = np.array([len(a) for a in frames])
        f["energy"] = np.array([lab["energy"] for lab in labels])
        f["cell"] = np.stack([a.cell.array for a in frames])
        f["pbc"] = np.stack([a.pbc for a in frames])
        if has_stress:
            f["stress"] = np.stack([a.get_stress(voigt=True) for a in frames])


def read_hdf5(path: str | Path) -> list[Atoms]:
    """Read frames written by :func:`write_hdf5`."""
    import h5py

    with h5py.File(path, "r") as f:
        missing = {"numbers", "positions", "n_atoms", "cell", "pbc"} - set(f.keys())
        if missing:
            raise ValueError(f"{path} is not a blip-ase HDF5 data file: missing datasets {sorted(missing)}")
        data = {k: f[k][()] for k in f.keys()}
    starts = np.concatenate([[0], np.cumsum(data["n_atoms"])])
    frames = []
    for k in range(len(data["n_atoms"])):
        sl = slice(starts[k], starts[k + 1])
        atoms = Atoms(numbers=data["numbers"][sl], positions=data["positions"][sl], cell=data["cell"][k], pbc=data["pbc"][k])
        results = {}
        if "energy" in data:
            results["energy"] = float(data["energy"][k])
        if "forces" in data:
            results["forces"] = data["forces"][sl]
        if "stress" in data:
            results["stress"] = data["stress"][k]
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames
