"""Exports of an uncertainty-monitored run: flagged frames, uncertainty history, summary, plot.

Flagged frames go to two formats meant for DFT relabelling:

- extended XYZ (:class:`ExtXYZFrameWriter`), readable by ``ase.io.read(path, ":")``;
- HDF5 (:class:`HDF5FrameWriter`), one appendable dataset per quantity.

Model predictions carry a ``blip_`` prefix (``blip_energy``, ``blip_forces``,
``blip_forces_variance``, ``blip_energy_variance``, ``blip_stress``, ``blip_stress_variance``)
so they never collide with the reference labels (``energy``, ``forces``) a DFT code adds later.
Bookkeeping keys are ``step``, ``time`` (fs), ``reason`` and ``flagged_atoms`` (per-atom bool).

The trajectory (:class:`TrajectoryObserver`, an ASE ``.traj`` with ``info["step"]``) is the
restart point (:func:`read_restart`).

Crash safety: the extxyz writer appends each frame with one ``write`` system call; the HDF5
writer opens the file, appends to every dataset, updates the ``n_frames`` attribute last, flushes
and closes it, so between frames the file is complete and readable (also while the run goes on),
and :func:`read_hdf5_frames` reads only frames present in every dataset. A run killed with SIGKILL
therefore leaves every frame flagged so far in both files. HDF5 file locking is off for this file
(``locking=False``): a reader that has it open (a viewer, a polling script) must never make the
writer, and so the MD run, fail.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from ase import Atoms, units

HISTORY_FIELDS = (
    "step",
    "time_fs",
    "temperature_K",
    "max_force_std",
    "max_relative_force_std",
    "energy_std",
    "energy_std_per_atom",
    "level",
    "check",
    "screen_bound",
)
"""Columns of the uncertainty history (``level``: 0 ok, 1 flagged, 2 halted; ``check``: the
checks that set the level, joined by ``+``, e.g. ``force_std`` or ``fragmented``; empty when ok;
``screen_bound``: for a check the uncertainty screen cleared without samples, the largest per-atom
bound on the force std (eV/A), and then the measured ``max_force_std``, ``energy_std`` ... are
``nan`` (not measured); ``nan`` for checks with samples)."""
WALKER_HISTORY_FIELDS = ("walker", *HISTORY_FIELDS)
"""Columns of a many-walker run's history (:mod:`blip_ase.md.walkers`)."""


@dataclass
class FlaggedFrame:
    """One configuration above the flag threshold, with the model's Monte Carlo statistics.

    Attributes:
        atoms: the configuration (numbers, positions, cell, pbc); Angstrom.
        step: MD step number.
        time_fs: simulation time, fs.
        reason: which thresholds were exceeded, e.g. ``"flag:max_force_std=0.31>0.2"``.
        flagged_atoms: ``(n,)`` bool, atoms above their own force-std flag threshold.
        energy: MC mean energy, eV.
        energy_variance: eV^2.
        forces: ``(n, 3)`` MC mean forces, eV/A.
        forces_variance: ``(n,)`` per-atom trace of the force covariance, eV^2/A^2.
        stress, stress_variance: ``(6,)`` Voigt, eV/A^3 and eV^2/A^6 (periodic cells only).
        extra: more per-frame integers (``int``) written under their own keys in both exports,
            e.g. ``{"walker": 3}`` for batched many-walker runs.
    """

    atoms: Atoms
    step: int
    time_fs: float
    reason: str
    flagged_atoms: np.ndarray
    energy: float
    energy_variance: float
    forces: np.ndarray
    forces_variance: np.ndarray
    stress: np.ndarray | None = None
    stress_variance: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


class FrameWriter(Protocol):
    """What :class:`~blip_ase.md.monitor.UncertaintyMonitor` needs from a writer."""

    path: Path

    def write(self, frame: FlaggedFrame) -> None: ...

    def truncate_after(self, step: int) -> None: ...


def _append_atomically(path: Path, text: str) -> None:
    """Append ``text`` with one ``O_APPEND`` write (looping only if the OS writes it partially)."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def write_extxyz_atomically(path: Path, frames: list[Atoms]) -> None:
    """Write ``frames`` as extxyz to a temporary file renamed into place (an empty file for none):
    a kill leaves the old file or the new one, never half of it."""
    from ase.io import write

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("")
    if frames:
        write(tmp, frames, format="extxyz")
    tmp.replace(path)


def frame_to_atoms(frame: FlaggedFrame) -> Atoms:
    """A calculator-free ``Atoms`` with the prefixed predictions in ``info``/``arrays``."""
    src = frame.atoms
    atoms = Atoms(numbers=src.numbers, positions=src.positions, cell=src.cell, pbc=src.pbc)
    atoms.info.update(
        blip_energy=float(frame.energy),
        blip_energy_variance=float(frame.energy_variance),
        step=int(frame.step),
        time=float(frame.time_fs),
        reason=str(frame.reason),
    )
    if frame.stress is not None:
        atoms.info["blip_stress"] = np.asarray(frame.stress, dtype=float)
        atoms.info["blip_stress_variance"] = np.asarray(frame.stress_variance, dtype=float)
    atoms.info.update({key: int(value) for key, value in frame.extra.items()})
    atoms.arrays["blip_forces"] = np.asarray(frame.forces, dtype=float).reshape(-1, 3)
    atoms.arrays["blip_forces_variance"] = np.asarray(frame.forces_variance, dtype=float).reshape(-1)
    atoms.arrays["flagged_atoms"] = np.asarray(frame.flagged_atoms, dtype=bool).reshape(-1)
    return atoms


class _AppendedFile:
    """A file that frames are appended to.

    Args:
        path: output file; created (emptied unless ``append``) on construction.
        append: keep existing frames (restart).
    """

    def __init__(self, path: str | Path, *, append: bool = False):
        self.path = Path(path)
        if not append or not self.path.exists():
            self._start()

    def _start(self) -> None:
        """Create the file empty (subclasses write their header)."""
        self.path.write_text("")


class ExtXYZFrameWriter(_AppendedFile):
    """Appends flagged frames to an extended XYZ file (one open/append/close per frame); arguments
    as for every appended file (``path``, ``append``)."""

    def write(self, frame: FlaggedFrame) -> None:
        """Append one frame with a single ``write`` system call (a kill never leaves half a frame)."""
        from ase.io import write

        buffer = io.StringIO()
        write(buffer, frame_to_atoms(frame), format="extxyz")
        _append_atomically(self.path, buffer.getvalue())

    def truncate_after(self, step: int) -> None:
        """Drop frames with ``info['step'] > step`` (a restart re-runs those steps)."""
        from ase.io import read

        if self.path.stat().st_size == 0:
            return
        frames = [a for a in read(self.path, ":", format="extxyz") if int(a.info["step"]) <= step]
        write_extxyz_atomically(self.path, frames)


PER_ATOM = ("numbers", "positions", "blip_forces", "blip_forces_variance", "flagged_atoms")
HDF5_FORMAT = 2


class HDF5FrameWriter(_AppendedFile):
    """Appends flagged frames to HDF5 datasets (``maxshape=(None, ...)``), closing after each.

    Layout (attribute ``format`` = 2): frames may differ in size (walkers of different
    molecules), so per-atom datasets are concatenated over frames, ``A`` = total atoms:
    ``numbers (A,)``, ``positions (A, 3)``, ``blip_forces (A, 3)``, ``blip_forces_variance (A,)``,
    ``flagged_atoms (A,)``; frame ``k`` holds rows ``sum(n_atoms[:k])`` onwards. Per-frame
    datasets: ``n_atoms (F,)``, ``pbc (F, 3)``, ``cell (F, 3, 3)``, ``blip_energy (F,)``,
    ``blip_energy_variance (F,)``, ``step (F,)``, ``time (F,)`` fs, ``reason (F,)`` strings, for
    periodic cells ``blip_stress (F, 6)``, ``blip_stress_variance (F, 6)``, and one ``(F,)``
    integer dataset per key of :attr:`FlaggedFrame.extra` (``walker``). Attribute ``units``
    documents units. A file of the earlier one-size layout (no ``format``) is converted in place
    when appended to. Arguments as for every appended file (``path``, ``append``).
    """

    def __init__(self, path: str | Path, *, append: bool = False):
        super().__init__(path, append=append)
        if append:
            _upgrade_hdf5(self.path)

    def _start(self) -> None:
        import h5py

        with h5py.File(self.path, "w", locking=False) as fh:
            fh.attrs["units"] = "energy eV, forces eV/A, variances squared units, time fs, stress eV/A^3"
            fh.attrs["format"] = HDF5_FORMAT
            fh.attrs["n_frames"] = 0

    def _create(self, fh, frame: FlaggedFrame) -> None:
        import h5py

        shapes = {
            "numbers": ((), "i8"),
            "positions": ((3,), "f8"),
            "blip_forces": ((3,), "f8"),
            "blip_forces_variance": ((), "f8"),
            "flagged_atoms": ((), "bool"),
            "n_atoms": ((), "i8"),
            "pbc": ((3,), "bool"),
            "cell": ((3, 3), "f8"),
            "blip_energy": ((), "f8"),
            "blip_energy_variance": ((), "f8"),
            "step": ((), "i8"),
            "time": ((), "f8"),
            "reason": ((), h5py.string_dtype()),
        }
        if frame.stress is not None:
            shapes.update(blip_stress=((6,), "f8"), blip_stress_variance=((6,), "f8"))
        shapes.update({name: ((), "i8") for name in frame.extra})
        for name, (shape, dtype) in shapes.items():
            chunk = 256 if name in PER_ATOM else 16
            fh.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(chunk, *shape))

    def write(self, frame: FlaggedFrame) -> None:
        import h5py

        per_frame = {
            "n_atoms": len(frame.atoms),
            "pbc": np.asarray(frame.atoms.pbc, dtype=bool),
            "cell": frame.atoms.cell.array,
            "blip_energy": frame.energy,
            "blip_energy_variance": frame.energy_variance,
            "step": frame.step,
            "time": frame.time_fs,
            "reason": frame.reason,
            "blip_stress": frame.stress,
            "blip_stress_variance": frame.stress_variance,
            **{name: int(value) for name, value in frame.extra.items()},
        }
        per_atom = {
            "numbers": np.asarray(frame.atoms.numbers, dtype=np.int64),
            "positions": frame.atoms.positions,
            "blip_forces": frame.forces,
            "blip_forces_variance": frame.forces_variance,
            "flagged_atoms": frame.flagged_atoms,
        }
        with h5py.File(self.path, "a", locking=False) as fh:
            if "step" not in fh:
                self._create(fh, frame)
            k = int(fh.attrs["n_frames"])
            start = int(np.sum(fh["n_atoms"][:k]))
            for name, value in per_atom.items():
                fh[name].resize(start + len(frame.atoms), axis=0)
                fh[name][start:] = value
            for name, value in per_frame.items():
                if name in fh:
                    fh[name].resize(k + 1, axis=0)
                    fh[name][k] = value
            fh.attrs["n_frames"] = k + 1  # last: a frame counts once every dataset holds it
            fh.flush()

    def truncate_after(self, step: int) -> None:
        """Drop frames with ``step > step`` (a restart re-runs those steps)."""
        import h5py

        with h5py.File(self.path, "a", locking=False) as fh:
            if "step" not in fh:
                return
            n = int(fh.attrs["n_frames"])
            keep = int(np.sum(fh["step"][:n] <= step))
            atoms = int(np.sum(fh["n_atoms"][:keep]))
            for name in list(fh):
                fh[name].resize(atoms if name in PER_ATOM else keep, axis=0)
            fh.attrs["n_frames"] = keep


def _upgrade_hdf5(path: Path) -> None:
    """Convert a flagged-frame file of the one-size layout (before ``format`` 2: per-run
    ``numbers (n,)`` and ``pbc (3,)``, per-frame ``positions (F, n, 3)`` ...) to the ragged one,
    in place, keeping every complete frame."""
    import h5py

    with h5py.File(path, "a", locking=False) as fh:
        if int(fh.attrs.get("format", 1)) >= HDF5_FORMAT:
            return
        if "step" in fh:
            n = min([int(fh.attrs.get("n_frames", 0))] + [fh[k].shape[0] for k in fh if fh[k].maxshape[:1] == (None,)])
            data = {k: fh[k][:] if fh[k].maxshape[:1] != (None,) else fh[k][:n] for k in fh}
            size = len(data["numbers"])
            data["numbers"] = np.tile(data["numbers"], n)
            data["pbc"] = np.tile(data["pbc"], (n, 1))
            data["n_atoms"] = np.full(n, size, dtype=np.int64)
            for k in PER_ATOM[1:]:
                data[k] = data[k].reshape(n * size, *data[k].shape[2:])
            for k in list(fh):
                del fh[k]
            for k, value in data.items():
                chunk = 256 if k in PER_ATOM else 16
                fh.create_dataset(k, data=value, maxshape=(None, *value.shape[1:]), chunks=(chunk, *value.shape[1:]))
            fh.attrs["n_frames"] = n
        fh.attrs["format"] = HDF5_FORMAT


_HDF5_KEYS = {"n_atoms", "pbc", "cell", "blip_energy", "blip_energy_variance", "step", "time", "reason",
              "blip_stress", "blip_stress_variance", *PER_ATOM}  # fmt: skip


def read_hdf5_frames(path: str | Path) -> list[Atoms]:
    """Flagged frames of an HDF5 export as ``Atoms`` with the same keys as the extxyz export
    (either layout of :class:`HDF5FrameWriter`)."""
    import h5py

    frames: list[Atoms] = []
    with h5py.File(path, "r", locking=False) as fh:
        if "step" not in fh:
            return frames
        ragged = int(fh.attrs.get("format", 1)) >= HDF5_FORMAT
        per_frame = [k for k in fh if fh[k].maxshape[:1] == (None,) and not (ragged and k in PER_ATOM)]
        # frames complete in every dataset (n_frames is written last)
        n = min([int(fh.attrs.get("n_frames", 0))] + [fh[k].shape[0] for k in per_frame])
        data = {k: fh[k][:n] if k in per_frame else fh[k][:] for k in fh}
    if ragged:
        offsets = np.concatenate([[0], np.cumsum(data["n_atoms"])])
        rows = [slice(offsets[k], offsets[k + 1]) for k in range(n)]
    for k in range(n):
        if ragged:
            atom = {name: data[name][rows[k]] for name in PER_ATOM}
            pbc = data["pbc"][k]
        else:
            atom = {name: data[name] if name == "numbers" else data[name][k] for name in PER_ATOM}
            pbc = data["pbc"]
        atoms = Atoms(numbers=atom["numbers"], positions=atom["positions"], cell=data["cell"][k], pbc=pbc)
        reason = data["reason"][k]
        atoms.info.update(
            blip_energy=float(data["blip_energy"][k]),
            blip_energy_variance=float(data["blip_energy_variance"][k]),
            step=int(data["step"][k]),
            time=float(data["time"][k]),
            reason=reason.decode() if isinstance(reason, bytes) else str(reason),
        )
        for name in ("blip_stress", "blip_stress_variance"):
            if name in data:
                atoms.info[name] = data[name][k]
        for name in ("blip_forces", "blip_forces_variance", "flagged_atoms"):
            atoms.arrays[name] = atom[name]
        for name in set(data) - _HDF5_KEYS:  # FlaggedFrame.extra
            atoms.info[name] = int(data[name][k])
        frames.append(atoms)
    return frames


class HistoryCSV(_AppendedFile):
    """The monitor's history as CSV, one flushed line per checked frame (columns ``fields``:
    ``HISTORY_FIELDS``, or ``WALKER_HISTORY_FIELDS`` for many-walker runs)."""

    fields: tuple[str, ...] = HISTORY_FIELDS

    def _start(self) -> None:
        self.path.write_text(",".join(self.fields) + "\n")

    def write(self, record: dict) -> None:
        buffer = io.StringIO()
        csv.writer(buffer).writerow([record.get(k, "") for k in self.fields])
        _append_atomically(self.path, buffer.getvalue())

    def truncate_after(self, step: int) -> None:
        rows = [r for r in read_history(self.path) if r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(self.fields)
            out.writerows([[r.get(k, "") for k in self.fields] for r in rows])
        tmp.replace(self.path)


class WalkerHistoryCSV(HistoryCSV):
    """History of a many-walker run: ``HISTORY_FIELDS`` with the walker id first."""

    fields = WALKER_HISTORY_FIELDS


def read_history(path: str | Path) -> list[dict]:
    """Rows of a history CSV as dicts of numbers (an incomplete last line is skipped); a
    many-walker history also has ``walker``."""
    rows = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        names = [k for k in WALKER_HISTORY_FIELDS if k in (reader.fieldnames or ()) and k != "check"]
        for row in reader:
            try:
                rec = {k: float(row[k]) for k in names}
            except (TypeError, ValueError):
                continue
            rec["check"] = row.get("check") or ""
            for k in ("walker", "step", "level"):
                if k in rec:
                    rec[k] = int(rec[k])
            rows.append(rec)
    return rows


def plot_history(
    path: str | Path,
    history: list[dict],
    *,
    flag: float | None,
    halt: float | None,
    title: str = "",
    labels: dict[int, str] | None = None,
    per_element: Mapping[str, tuple[float | None, float | None]] | None = None,
):
    """PNG of the max per-atom force std (eV/A) and the temperature (K) against the step (time in
    fs on the top axis); one line per walker, each in the legend, when the records have a
    ``walker`` key. The legend shows only what happened: flagged and halted points (with the
    check that halted) appear when there are some; threshold lines when they are set.

    Args:
        path: output PNG.
        history: records with the ``HISTORY_FIELDS`` keys (and ``walker``).
        flag, halt: force-std thresholds drawn as horizontal lines (None = not drawn).
        title: figure title.
        labels: walker id -> its legend label (default ``walker k``).
        per_element: element -> ``(flag, halt)`` (eV/A); when given these lines replace
            ``flag``/``halt`` (thresholds in calibrated units resolve per element). Checks the
            uncertainty screen cleared are drawn as grey dots at their bound.

    Returns:
        The (closed) matplotlib figure, for inspection.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    step = np.array([r["step"] for r in history], dtype=float)
    std = np.array([r["max_force_std"] for r in history], dtype=float)
    temperature = np.array([r["temperature_K"] for r in history], dtype=float)
    walker = np.array([r.get("walker", -1) for r in history], dtype=int)
    lines = np.unique(walker)
    many = len(lines) > 1 or lines.tolist() != [-1]
    fig, (ax, ax_t) = plt.subplots(2, 1, figsize=(9 if many else 7, 5), sharex=True, height_ratios=(2, 1))
    for k, w in enumerate(lines):
        mine = walker == w
        color = plt.cm.tab20(k % 20) if many else "tab:blue"
        label = (labels or {}).get(int(w), f"walker {w}") if many else "max atomic force std"
        ax.plot(step[mine], std[mine], "-", color=color, lw=1, label=label)
        ax_t.plot(step[mine], temperature[mine], color=color if many else "tab:gray", lw=1)
    _mark_events(ax, history, flag=flag, halt=halt, per_element=per_element)
    positive = std[std > 0]
    if positive.size and positive.max() > 10 * np.median(positive):  # a blow-up would flatten the rest
        ax.set_yscale("log")
    ax.set_ylabel("force std (eV/A)")
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(lines) // 20)
    else:
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=9)
    fs_per_step = _fs_per_step(history)
    if fs_per_step:
        top = ax.secondary_xaxis("top", functions=(lambda x: x * fs_per_step, lambda x: x / fs_per_step))
        top.set_xlabel("time (fs)", fontsize=8)
    ax_t.set_ylabel("T (K)")
    ax_t.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def _mark_events(
    ax, history: list[dict], *, flag: float | None, halt: float | None,
    per_element: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> None:  # fmt: skip
    """Screened, flagged and halted points (one legend entry per halting check) and the threshold
    lines (per element when given), each only if there is one."""
    step = np.array([r["step"] for r in history], dtype=float)
    std = np.array([r["max_force_std"] for r in history], dtype=float)
    level = np.array([r["level"] for r in history], dtype=int)
    bound = np.array([r.get("screen_bound", np.nan) for r in history], dtype=float)
    screened = np.isfinite(bound)
    if screened.any():
        ax.plot(step[screened], bound[screened], ".", color="0.6", ms=3, zorder=2,
                label=f"screened, bound (no samples; {int(screened.sum())})")  # fmt: skip
    if (level == 1).any():
        ax.plot(step[level == 1], std[level == 1], "o", mfc="none", mec="tab:orange", mew=1.5, ms=6,
                zorder=5, label=f"flagged ({int((level == 1).sum())})")  # fmt: skip
    for check in dict.fromkeys(r.get("check", "") for r in history if r["level"] == 2):
        mine = np.array([r["level"] == 2 and r.get("check", "") == check for r in history])
        ax.plot(step[mine], np.nan_to_num(std[mine]), "X", color="tab:red", mec="k", ms=9, zorder=6,
                label=f"halted: {check or 'halt'} ({int(mine.sum())})")  # fmt: skip
    lines = {"": (flag, halt)} if not per_element else {f" {k}": tuple(v) for k, v in per_element.items()}
    styles = ["--", ":", "-.", (0, (5, 1))]
    for k, (name, (f, h)) in enumerate(lines.items()):
        for value, kind, color in ((f, "flag", "tab:orange"), (h, "halt", "tab:red")):
            if value is not None:
                label = f"{kind}{name} = {value:.3g} eV/A"
                ax.axhline(value, color=color, ls=styles[k % len(styles)], lw=1, label=label)


def _fs_per_step(history: list[dict]) -> float | None:
    """The time step (fs) if every record's time is its step times one constant."""
    pairs = [(r["step"], r["time_fs"]) for r in history if r["step"] > 0]
    if not pairs:
        return None
    dt = pairs[0][1] / pairs[0][0]
    return dt if dt > 0 and all(abs(t - s * dt) <= 1e-6 * max(t, 1) for s, t in pairs) else None


def read_restart(out: Path) -> tuple[Atoms, int]:
    """Last complete frame of ``out/md.traj`` (positions, momenta, cell) and its step."""
    from ase.io.trajectory import Trajectory

    with Trajectory(out / "md.traj") as traj:
        if len(traj) == 0:
            raise ValueError(f"cannot restart: {out / 'md.traj'} holds no frame")
        atoms = traj[-1]
    step = int(atoms.info.get("step", 0))
    atoms.info.clear()
    return atoms, step


class TrajectoryObserver:
    """Writes ``atoms`` with ``info['step']`` and ``info['time_fs']`` to an ASE trajectory."""

    def __init__(self, dyn, atoms: Atoms, path: Path, *, append: bool):
        from ase.io.trajectory import Trajectory

        self.dyn, self.atoms = dyn, atoms
        self.traj = Trajectory(path, "a" if append else "w")
        self.last_step: int | None = None

    def __call__(self) -> None:
        step = int(self.dyn.nsteps)
        if step == self.last_step:
            return
        frame = self.atoms.copy()
        frame.info = {"step": step, "time_fs": round(float(self.dyn.get_time() / units.fs), 9)}
        self.traj.write(frame)
        self.last_step = step

    def close(self) -> None:
        self.traj.close()
