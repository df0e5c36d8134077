"""The four stages of a round, as functions ``stage(run, state) -> state``.

Each stage reads what the previous one wrote under ``round_<k>/``, writes its own files
atomically and returns the next :class:`~blip_ase.active.state.LoopState` (the caller stores it
in ``state.json``). A stage run again after a kill redoes only what is missing: exploration
re-runs unfinished walkers (a batched exploration runs again whole), labelling skips frames that
already have a label file, an interrupted fine-tune starts again from the previous model.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from blip_ase.active.config import LearnConfig
from blip_ase.active.oracle import Label, checked, label_frames
from blip_ase.active.report import plot_report, write_report
from blip_ase.active.state import LoopState
from blip_ase.data.readers import read_frames
from blip_ase.md.writers import write_extxyz_atomically
from blip_ase.strict_json import write_json
from blip_ase.training.config import with_overrides

PROVENANCE_KEYS = ("frame_id", "round", "walker", "step", "temperature_K", "uncertainty")


@dataclass(frozen=True)
class Run:
    """What every stage needs besides the state: the settings, the directory and the device."""

    config: LearnConfig
    out: Path
    device: str | None = None

    def rdir(self, state: LoopState) -> Path:
        return self.out / f"round_{state.round}"

    def save(self, state: LoopState) -> LoopState:
        write_report(self.out, state)
        return state


def read_extxyz(path: Path) -> list[Atoms]:
    """Frames of an extxyz file the loop wrote (empty file: none)."""
    return read(path, ":", format="extxyz") if path.stat().st_size else []


def final_reason(config: LearnConfig, rounds_done: int, labels_spent: int) -> str | None:
    """Why the next exploration is the last one (it only tests the model), or None."""
    stop = config.stop
    if rounds_done >= stop.max_rounds:
        return f"max_rounds: {stop.max_rounds} rounds of labelling done"
    if stop.max_labels is not None and labels_spent >= stop.max_labels:
        return f"label budget spent: {labels_spent} oracle calls"
    return None


def stop(run: Run, state: LoopState, reason: str) -> LoopState:
    state = run.save(state.replace(status="stopped", stopped=reason, stage="explore"))
    plot_report(run.out, list(state.rounds), n_start=state.n_start_labels)
    return state


def next_round(run: Run, state: LoopState) -> LoopState:
    final = final_reason(run.config, state.round, state.labels_spent)
    plot_report(run.out, list(state.rounds), n_start=state.n_start_labels)
    return run.save(state.replace(final=final, round=state.round + 1, stage="explore"))


# --------------------------------------------------------------------------------------------- explore


def explore(run: Run, state: LoopState) -> LoopState:
    """Monitored MD of every walker with the current model; the flagged pool of the round."""
    from blip_ase.active.exploration import run_exploration

    c, start = run.config, time.perf_counter()
    state = state.with_row(test_forces_mae=test_mae(run, state))
    summaries, pool = run_exploration(c, run.rdir(state), state.model, state.round, device=run.device)
    write_extxyz_atomically(run.rdir(state) / "flagged.extxyz", pool)
    n_checked = sum(s.get("n_checked", 0) for s in summaries)
    flagged_checks = sum(s.get("n_flagged", 0) for s in summaries)
    state = state.with_row(
        n_walkers=len(summaries), n_checked=n_checked, n_flagged=len(pool),
        flagged_fraction=flagged_checks / n_checked if n_checked else None,
        md_steps_completed=sum(int(s.get("final_step", 0)) for s in summaries),
        md_steps_requested=c.explore.steps * len(summaries),
        halted=sum(s.get("status") != "completed" for s in summaries),
        seconds_md=state.row.get("seconds_md", 0.0) + time.perf_counter() - start,  # a restart adds to it
    )  # fmt: skip
    row, mff = state.row, c.stop.max_flagged_fraction
    if row["halted"] == 0 and (mff is None or (row["flagged_fraction"] or 0.0) <= mff):
        return stop(run, state, "converged: every walker completed its steps" + ("" if mff is None else
                    f" with {row['flagged_fraction']:.3f} <= {mff} of its checks flagged"))  # fmt: skip
    if state.final:
        return stop(run, state, state.final)
    return run.save(state.replace(stage="select"))


def test_mae(run: Run, state: LoopState) -> float | None:
    if run.config.test_data is None:
        return None
    return metrics(run, state.model, run.config.test_data)["forces_mae"]


def metrics(run: Run, model_path: str, data: str) -> dict:
    from blip_ase.models.checkpoint import load_checkpoint
    from blip_ase.uq.evaluate import compute_metrics, predict, read_labelled

    model, ckpt = load_checkpoint(model_path)
    frames, labels = read_labelled(data)
    pred = predict(model, frames, labels, n_samples=run.config.train.calibration_samples, seed=run.config.seed,
                   device=run.device)  # fmt: skip
    return compute_metrics(pred, ckpt.get("calibration"))


# --------------------------------------------------------------------------------------------- select


def select(run: Run, state: LoopState) -> LoopState:
    """At most ``select.budget`` frames of the flagged pool (and of the label budget left)."""
    from blip_ase.active.selection import descriptors
    from blip_ase.active.selection import select as choose
    from blip_ase.models.checkpoint import load_checkpoint

    c, rdir = run.config, run.rdir(state)
    pool = read_extxyz(rdir / "flagged.extxyz")
    budget = c.select.budget
    if c.stop.max_labels is not None:
        budget = min(budget, c.stop.max_labels - state.labels_spent)
    uncertainty = np.array([a.info["uncertainty"] for a in pool])
    if c.select.strategy == "random":
        desc = reference = np.zeros((len(pool), 1))
    else:
        model = load_checkpoint(state.model)[0]
        per_atom = c.select.strategy == "fps" and c.select.descriptor == "atoms"
        desc = descriptors(model, pool, per_atom=per_atom)
        reference = descriptors(model, training_frames(run, state), per_atom=per_atom)
    chosen = choose(desc, uncertainty, c.select, k=budget, reference=reference, round_index=state.round)
    write_extxyz_atomically(rdir / "selected.extxyz", [pool[i] for i in chosen])
    state = state.with_row(n_selected=len(chosen))
    if not chosen:
        return stop(run, state, "nothing to label: every flagged frame is a near-duplicate of labelled data")
    return run.save(state.replace(stage="label"))


def training_frames(run: Run, state: LoopState) -> list[Atoms]:
    """The starting training data and every labelled frame of earlier rounds."""
    frames = read_frames(run.config.train_data)
    for k in range(1, state.round):
        path = run.out / f"round_{k}" / "labelled.extxyz"
        frames += read_extxyz(path) if path.is_file() else []
    return frames


# --------------------------------------------------------------------------------------------- label


def label(run: Run, state: LoopState) -> LoopState:
    """Oracle labels of the selected frames, each written as it arrives; external labels are
    read from ``labelled.extxyz`` (without it: ``to_label.extxyz`` is written and the loop waits)."""
    c, rdir, start = run.config, run.rdir(state), time.perf_counter()
    selected = read_extxyz(rdir / "selected.extxyz")
    (rdir / "labels").mkdir(exist_ok=True)
    todo = [k for k, a in enumerate(selected) if stored_label(rdir, a.info["frame_id"]) is None]
    if todo and c.oracle.kind == "external":
        given = rdir / "labelled.extxyz"
        if not given.is_file():
            write_extxyz_atomically(rdir / "to_label.extxyz", selected)
            return run.save(state.replace(status="waiting", waiting_for=str(given)))
        import_external(run, rdir, selected, todo)
    todo = [k for k in todo if stored_label(rdir, selected[k].info["frame_id"]) is None]
    label_frames([selected[k] for k in todo], c.oracle, lambda i, lab: store(run, rdir, selected[todo[i]], lab))
    n_ok, failures = merge(run, state, selected)
    state = state.with_row(n_labelled=n_ok, n_failed=len(failures), failures=failures,
                           seconds_label=state.row.get("seconds_label", 0.0) + time.perf_counter() - start)
    state = state.replace(labels_spent=state.labels_spent + len(selected))
    return next_round(run, state) if not n_ok else run.save(state.replace(stage="train"))


def stored_label(rdir: Path, frame_id: str) -> Path | None:
    for name in (f"{frame_id}.extxyz", f"{frame_id}.failed.json"):
        if (rdir / "labels" / name).is_file():
            return rdir / "labels" / name
    return None


def labelled_frame(atoms: Atoms, energy: float, forces: np.ndarray, info: dict) -> Atoms:
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info.update(info)
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces)
    return out


def store(run: Run, rdir: Path, atoms: Atoms, result: Label) -> None:
    """Write one oracle result at once (atomically) and log the call."""
    frame_id = atoms.info["frame_id"]
    result = checked(result, len(atoms))
    if result.error is None:
        info = {k: atoms.info[k] for k in PROVENANCE_KEYS} | {"oracle": run.config.oracle.name}
        frame = labelled_frame(atoms, result.energy, result.forces, info)
        write_extxyz_atomically(rdir / "labels" / f"{frame_id}.extxyz", [frame])
    else:
        write_json(rdir / "labels" / f"{frame_id}.failed.json", {"frame_id": frame_id, "error": result.error})
    line = json.dumps({"frame_id": frame_id, "ok": result.error is None, "seconds": result.seconds,
                       "pid": result.pid, "host": result.host})  # fmt: skip
    with open(rdir / "labels.log", "a") as fh:
        fh.write(line + "\n")


def import_external(run: Run, rdir: Path, selected: list[Atoms], todo: list[int]) -> None:
    """Label files from the user's ``labelled.extxyz`` (ValueError naming an unreadable file)."""
    given = rdir / "labelled.extxyz"
    frames = read_frames(given) if given.stat().st_size else []
    shutil.copyfile(given, rdir / "labelled.external.extxyz")
    by_id = {a.info.get("frame_id"): a for a in frames}
    for k in todo:
        atoms = selected[k]
        got = by_id.get(atoms.info["frame_id"])
        if got is None:
            result = Label(error="missing from labelled.extxyz")
        else:
            results = got.calc.results if got.calc is not None else {}
            result = Label(energy=results.get("energy", got.info.get("energy")),
                           forces=results.get("forces", got.arrays.get("forces")))  # fmt: skip
        store(run, rdir, atoms, result)


def merge(run: Run, state: LoopState, selected: list[Atoms]) -> tuple[int, list[dict]]:
    """``labelled.extxyz`` from the label files, in selection order, with the split; returns the
    number of labels and the failures."""
    rdir = run.rdir(state)
    ok, failed = [], []
    for atoms in selected:
        path = stored_label(rdir, atoms.info["frame_id"])
        if path.suffix == ".json":
            failed.append(json.loads(path.read_text()))
        else:
            ok.append(read(path, format="extxyz"))
    n_val = int(round(run.config.train.val_fraction * len(ok)))
    val = set(np.random.default_rng([run.config.seed, state.round]).permutation(len(ok))[:n_val].tolist())
    for i, atoms in enumerate(ok):
        atoms.info["split"] = "val" if i in val else "train"
    write_extxyz_atomically(rdir / "labelled.extxyz", ok)
    return len(ok), failed


# --------------------------------------------------------------------------------------------- train


def train(run: Run, state: LoopState) -> LoopState:
    """Fine-tune from the current model on all data so far, calibrate, and go to the next round."""
    from blip_ase.training import train as fit
    from blip_ase.uq.evaluate import calibrate

    c, rdir, start = run.config, run.rdir(state), time.perf_counter()
    train_frames, val_frames = read_frames(c.train_data), read_frames(c.val_data)
    for k in range(1, state.round + 1):
        for atoms in read_extxyz(run.out / f"round_{k}" / "labelled.extxyz"):
            (val_frames if atoms.info["split"] == "val" else train_frames).append(atoms)
    write_extxyz_atomically(rdir / "train_set.extxyz", train_frames)
    write_extxyz_atomically(rdir / "val_set.extxyz", val_frames)
    fit(train_config(c, state.model, state.round, run.device), rdir / "train_set.extxyz", rdir / "val_set.extxyz",
        rdir / "train", overwrite=True, init_checkpoint=state.model)  # fmt: skip
    model = rdir / "model.pt"
    if c.train.calibrate:
        result = calibrate(rdir / "train" / "model.pt", rdir / "val_set.extxyz", model, power=c.train.power,
                           n_samples=c.train.calibration_samples, seed=c.seed, overwrite=True, device=run.device)
        val = result["after"]
    else:
        shutil.copyfile(rdir / "train" / "model.pt", model)
        val = metrics(run, str(model), str(rdir / "val_set.extxyz"))
    state = state.with_row(n_train_total=len(train_frames), n_val_total=len(val_frames),
                           val_forces_mae=val["forces_mae"], val_forces_ece=val["forces_ece"],
                           seconds_train=time.perf_counter() - start)  # fmt: skip
    return next_round(run, state.replace(model=str(model)))


STAGE_FUNCTIONS: dict[str, Callable[[Run, LoopState], LoopState]] = {
    "explore": explore, "select": select, "label": label, "train": train,
}  # fmt: skip


def train_config(config: LearnConfig, checkpoint: str, k: int, device: str | None):
    """The fine-tune of round ``k``: the checkpoint's own training configuration with ``train.config``
    applied (ValueError for an unknown key or choice)."""
    from blip_ase.models.checkpoint import read_checkpoint
    from blip_ase.training.config import TrainConfig, from_dict

    stored = (read_checkpoint(checkpoint).get("training") or {}).get("config")
    base = from_dict(TrainConfig, stored, "the checkpoint's training config") if stored else TrainConfig()
    overrides = {"seed": config.seed + k, "progress": False, "ensemble": 1, **config.train.config}
    overrides |= {} if device is None else {"device": device}
    return with_overrides(base, overrides, "train.config")
