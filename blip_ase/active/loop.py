"""The active-learning loop behind ``blip learn``: explore, select, label, fine-tune, round after round.

Layout of ``out``::

    state.json              round, stage, current model, labels spent, rows of the report
    report.csv, report.png  one row per round (see :mod:`blip_ase.active.report`)
    round_<k>/md/walker_<w>/    one ``blip md`` run per (structure, temperature)
    round_<k>/flagged.extxyz    every walker's flagged frames, with walker, round, uncertainty, frame_id
    round_<k>/selected.extxyz   the frames chosen for labelling
    round_<k>/labels/           one file per oracle result (``<id>.extxyz`` or ``<id>.failed.json``),
                                written as each arrives; labels.log: one line per finished oracle call
    round_<k>/labelled.extxyz   the round's labels with provenance (round, walker, step,
                                uncertainty, oracle) and ``split`` (train or val)
    round_<k>/train/            the fine-tune (log.csv, uncalibrated model.pt)
    round_<k>/model.pt          the calibrated model of the round; metrics.json: the round's row

Every stage starts from what the previous one wrote and ends by rewriting ``state.json``; a
restart resumes the stage that was running. Labelling skips frames that already have a label
file; an interrupted exploration re-runs its unfinished walkers; an interrupted fine-tune starts
again from the previous model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols
from ase.io import read

from blip_ase.active.config import LearnConfig
from blip_ase.active.oracle import Label, check_oracle, checked, label_frames
from blip_ase.active.report import STAGES, plot_report, read_state, write_report
from blip_ase.data.readers import frame_labels, read_frames
from blip_ase.md.writers import write_extxyz_atomically
from blip_ase.strict_json import write_json

PROVENANCE_KEYS = ("frame_id", "round", "walker", "step", "temperature_K", "uncertainty")
RESTART_CHANGEABLE = {"stop", "oracle.workers"}  # config entries a restart may change


def _read_frames(path: Path) -> list[Atoms]:
    return read(path, ":", format="extxyz") if path.stat().st_size else []


def _labelled(atoms: Atoms, energy: float, forces: np.ndarray, info: dict) -> Atoms:
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info.update(info)
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces)
    return out


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("md", "kwargs", "config"):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_inputs(config: LearnConfig, out: Path, *, restart: bool) -> dict | None:
    """Everything checked before any work; returns the stored state on restart.

    Raises:
        FileExistsError: ``out`` exists (not empty) without ``restart``.
        FileNotFoundError: a missing file, or ``restart`` without ``state.json``.
        ValueError: an unusable model, structure, oracle or data file (named), or a restart
            config that changes more than ``stop`` and ``oracle.workers``.
    """
    from blip_ase.md.run import read_structure
    from blip_ase.models.checkpoint import load_checkpoint

    state = None
    if restart:
        state = read_state(out)
        old, new = _flatten(state["config"]), _flatten(config.to_dict())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                         and not any(k == c or k.startswith(c + ".") for c in RESTART_CHANGEABLE))
        if changed:
            allowed = sorted(RESTART_CHANGEABLE)
            raise ValueError(f"--restart with a config that changes {changed}; only {allowed} may change")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output directory {out} already exists; pass --restart to continue its loop")
    for name in ("train_data", "val_data", "test_data"):
        path = getattr(config, name)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{name} {path} does not exist")
        for k, atoms in enumerate(read_frames(path) if path is not None else []):
            frame_labels(atoms, where=f"{name} {path} frame {k}")  # ValueError: no energy or forces
    current = state["model"] if state else config.model
    model, _ = load_checkpoint(current)
    train_config(config, current, 1, None)  # train.config: unknown keys refused now, not after the labels
    if not model.is_bayesian:
        raise ValueError(f"{current} is a deterministic model: the loop needs a BLIP model's uncertainty")
    structures = [read_structure(spec) for spec in config.explore.structures]
    check_oracle(config.oracle, structures)
    for spec, atoms in zip(config.explore.structures, structures):
        unknown = sorted(set(atoms.get_chemical_symbols()) - {chemical_symbols[z] for z in model.elements})
        if unknown:
            raise ValueError(f"start structure {spec} has elements {unknown} the model {current} does not know")
    if config.select.strategy != "random" and not model.implements_descriptors:
        raise ValueError(f"select.strategy {config.select.strategy} needs the model's descriptors (the "
                         f"{model.backend} backend has none); use random")
    return state


def run_learn(
    config: LearnConfig, out: str | Path, *, max_rounds: int | None = None, restart: bool = False,
    device: str | None = None,
) -> dict:  # fmt: skip
    """Run (or, with ``restart``, continue) the loop until it stops or waits for external labels.

    Args:
        config: the loop. out: its directory. max_rounds: overrides ``config.stop.max_rounds``.
        device: torch device of the MD, the fine-tunes and the metrics (None: CUDA if available).

    Returns:
        The final ``state.json`` content; ``state["status"]`` is ``stopped`` (``state["stopped"]``
        says why) or ``waiting`` (external labels: ``state["waiting_for"]`` names the file).
    """
    import dataclasses

    if max_rounds is not None:
        config = dataclasses.replace(config, stop=dataclasses.replace(config.stop, max_rounds=max_rounds))
    out = Path(out)
    state = check_inputs(config, out, restart=restart)
    if state is None:
        out.mkdir(parents=True, exist_ok=True)
        state = {"status": "running", "round": 1, "stage": "explore", "final": False, "model": str(config.model),
                 "labels_spent": 0, "stopped": None, "rounds": []}
    state.update(config=config.to_dict(), status="running")
    state.pop("waiting_for", None)
    if state["stage"] == "explore":  # a restart may raise max_rounds or max_labels
        state["final"] = final_reason(config, state["round"] - 1, state["labels_spent"])
    loop = _Loop(config, out, state, device)
    loop.save()  # a kill before the first stage ends can be restarted
    while state["status"] == "running":
        loop.step()
    return state


def train_config(config: LearnConfig, checkpoint: str, k: int, device: str | None):
    """The fine-tune of round ``k``: the checkpoint's own training configuration with ``train.config``
    applied (ValueError for an unknown key or choice)."""
    from blip_ase.models.checkpoint import read_checkpoint
    from blip_ase.training.config import TrainConfig, from_dict, with_overrides

    stored = (read_checkpoint(checkpoint).get("training") or {}).get("config")
    base = from_dict(TrainConfig, stored, "the checkpoint's training config") if stored else TrainConfig()
    overrides = {"seed": config.seed + k, "progress": False, "ensemble": 1, **config.train.config}
    overrides |= {} if device is None else {"device": device}
    return with_overrides(base, overrides, "train.config")


def final_reason(config: LearnConfig, rounds_done: int, labels_spent: int) -> str | None:
    """Why the next exploration is the last one (it only tests the model), or None."""
    stop = config.stop
    if rounds_done >= stop.max_rounds:
        return f"max_rounds: {stop.max_rounds} rounds of labelling done"
    if stop.max_labels is not None and labels_spent >= stop.max_labels:
        return f"label budget spent: {labels_spent} oracle calls"
    return None


class _Loop:
    def __init__(self, config: LearnConfig, out: Path, state: dict, device: str | None):
        self.config, self.out, self.state, self.device = config, out, state, device

    @property
    def k(self) -> int:
        return int(self.state["round"])

    @property
    def rdir(self) -> Path:
        return self.out / f"round_{self.k}"

    @property
    def row(self) -> dict:
        rows = self.state["rounds"]
        if not rows or rows[-1]["round"] != self.k:
            rows.append({"round": self.k})
        return rows[-1]

    def save(self, stage: str | None = None) -> None:
        if stage is not None:
            self.state["stage"] = stage
        write_report(self.out, self.state)

    def step(self) -> None:
        stage = self.state["stage"]
        assert stage in STAGES, stage
        self.rdir.mkdir(exist_ok=True)
        getattr(self, stage)()

    def stop(self, reason: str) -> None:
        self.state.update(status="stopped", stopped=reason, stage="explore")
        self.save()
        plot_report(self.out, self.state["rounds"])

    # ---------------------------------------------------------------- explore
    def explore(self) -> None:
        from blip_ase.md.run import MDRunFailed, run_md

        c, row = self.config, self.row
        row["test_forces_mae"] = self._test_mae()
        start = time.perf_counter()
        walkers = [(s, T) for s in c.explore.structures for T in c.explore.temperatures_K]
        summaries, pool = [], []
        for w, (structure, T) in enumerate(walkers):
            wdir = self.rdir / "md" / f"walker_{w}"
            done = wdir / "summary.json"
            summary = json.loads(done.read_text()) if done.is_file() else {}
            if summary.get("status") not in ("completed", "halted", "failed"):
                md = c.explore.md_config(model=self.state["model"], structure=structure, out=str(wdir),
                                         temperature_K=T, seed=c.seed + 1000 * self.k + w, overwrite=True,
                                         **({} if self.device is None else {"device": self.device}))
                try:
                    summary = run_md(md)
                except MDRunFailed:  # an exploding system ends the walker like a halt
                    summary = json.loads(done.read_text())
                if summary["status"] == "interrupted":  # Ctrl-C: stop the loop, not the walker only
                    raise KeyboardInterrupt(f"walker {w} interrupted at step {summary['final_step']}")
            summaries.append(summary)
            for atoms in _read_frames(wdir / "flagged.extxyz"):
                step = int(atoms.info["step"])
                atoms.info.update(frame_id=f"r{self.k}w{w}s{step}", round=self.k, walker=w, temperature_K=T,
                                  uncertainty=float(np.sqrt(np.max(atoms.arrays["blip_forces_variance"]))))
                pool.append(atoms)
        write_extxyz_atomically(self.rdir / "flagged.extxyz", pool)
        n_checked = sum(s.get("n_checked", 0) for s in summaries)
        flagged_checks = sum(s.get("n_flagged", 0) for s in summaries)
        row.update(
            n_walkers=len(walkers), n_checked=n_checked, n_flagged=len(pool),
            flagged_fraction=flagged_checks / n_checked if n_checked else None,
            md_steps_completed=sum(int(s.get("final_step", 0)) for s in summaries),
            md_steps_requested=c.explore.steps * len(walkers),
            halted=sum(s.get("status") != "completed" for s in summaries),
            seconds_md=row.get("seconds_md", 0.0) + time.perf_counter() - start,  # a restart adds to it
        )  # fmt: skip
        mff = c.stop.max_flagged_fraction
        if row["halted"] == 0 and (mff is None or (row["flagged_fraction"] or 0.0) <= mff):
            return self.stop("converged: every walker completed its steps" + ("" if mff is None else
                             f" with {row['flagged_fraction']:.3f} <= {mff} of its checks flagged"))
        if self.state["final"]:
            return self.stop(self.state["final"])
        self.save("select")

    def _test_mae(self) -> float | None:
        if self.config.test_data is None:
            return None
        return self._metrics(self.state["model"], self.config.test_data)["forces_mae"]

    def _metrics(self, model_path: str, data: str) -> dict:
        from blip_ase.models.checkpoint import load_checkpoint
        from blip_ase.uq.evaluate import compute_metrics, predict, read_labelled

        model, ckpt = load_checkpoint(model_path)
        frames, labels = read_labelled(data)
        pred = predict(model, frames, labels, n_samples=self.config.train.calibration_samples, seed=self.config.seed,
                       device=self.device)
        return compute_metrics(pred, ckpt.get("calibration"))

    # ---------------------------------------------------------------- select
    def select(self) -> None:
        from blip_ase.active.selection import descriptors, select
        from blip_ase.models.checkpoint import load_checkpoint

        c = self.config
        pool = _read_frames(self.rdir / "flagged.extxyz")
        budget = c.select.budget
        if c.stop.max_labels is not None:
            budget = min(budget, c.stop.max_labels - self.state["labels_spent"])
        uncertainty = np.array([a.info["uncertainty"] for a in pool])
        if c.select.strategy == "random":
            desc = reference = np.zeros((len(pool), 1))
        else:
            model = load_checkpoint(self.state["model"])[0]
            desc = descriptors(model, pool)
            reference = descriptors(model, self._training_frames())
        chosen = select(desc, uncertainty, c.select, k=budget, reference=reference, round_index=self.k)
        write_extxyz_atomically(self.rdir / "selected.extxyz", [pool[i] for i in chosen])
        self.row["n_selected"] = len(chosen)
        if not chosen:
            return self.stop("nothing to label: every flagged frame is a near-duplicate of labelled data")
        self.save("label")

    def _training_frames(self) -> list[Atoms]:
        """The starting training data and every labelled frame of earlier rounds."""
        frames = read_frames(self.config.train_data)
        for k in range(1, self.k):
            path = self.out / f"round_{k}" / "labelled.extxyz"
            frames += _read_frames(path) if path.is_file() else []
        return frames

    # ---------------------------------------------------------------- label
    def label(self) -> None:
        c, start = self.config, time.perf_counter()
        selected = _read_frames(self.rdir / "selected.extxyz")
        labels_dir = self.rdir / "labels"
        labels_dir.mkdir(exist_ok=True)
        todo = [k for k, a in enumerate(selected) if self._stored_label(a.info["frame_id"]) is None]
        if todo and c.oracle.kind == "external" and not self._import_external(selected, todo):
            return
        todo = [k for k in todo if self._stored_label(selected[k].info["frame_id"]) is None]
        label_frames([selected[k] for k in todo], c.oracle, lambda i, lab: self._store(selected[todo[i]], lab))
        self._merge(selected)
        self.row["seconds_label"] = self.row.get("seconds_label", 0.0) + time.perf_counter() - start
        self.state["labels_spent"] += len(selected)
        if not self.row["n_labelled"]:
            self._next_round()
        else:
            self.save("train")

    def _stored_label(self, frame_id: str) -> Path | None:
        for name in (f"{frame_id}.extxyz", f"{frame_id}.failed.json"):
            if (self.rdir / "labels" / name).is_file():
                return self.rdir / "labels" / name
        return None

    def _store(self, atoms: Atoms, label: Label) -> None:
        """Write one oracle result at once (atomically) and log the call."""
        frame_id = atoms.info["frame_id"]
        label = checked(label, len(atoms))
        if label.error is None:
            info = {k: atoms.info[k] for k in PROVENANCE_KEYS} | {"oracle": self.config.oracle.name}
            frame = _labelled(atoms, label.energy, label.forces, info)
            write_extxyz_atomically(self.rdir / "labels" / f"{frame_id}.extxyz", [frame])
        else:
            write_json(self.rdir / "labels" / f"{frame_id}.failed.json", {"frame_id": frame_id, "error": label.error})
        line = json.dumps({"frame_id": frame_id, "ok": label.error is None, "seconds": label.seconds, "pid": label.pid})
        with open(self.rdir / "labels.log", "a") as fh:
            fh.write(line + "\n")

    def _import_external(self, selected: list[Atoms], todo: list[int]) -> bool:
        """Read ``labelled.extxyz`` written by the user into label files; without it write
        ``to_label.extxyz`` and wait (returns False)."""
        given = self.rdir / "labelled.extxyz"
        if not given.is_file():
            write_extxyz_atomically(self.rdir / "to_label.extxyz", selected)
            self.state.update(status="waiting", waiting_for=str(given))
            self.save()
            return False
        frames = read_frames(given) if given.stat().st_size else []  # ValueError naming an unreadable file
        shutil.copyfile(given, self.rdir / "labelled.external.extxyz")
        by_id = {a.info.get("frame_id"): a for a in frames}
        for k in todo:
            atoms = selected[k]
            got = by_id.get(atoms.info["frame_id"])
            if got is None:
                label = Label(error="missing from labelled.extxyz")
            else:
                results = got.calc.results if got.calc is not None else {}
                label = Label(energy=results.get("energy", got.info.get("energy")),
                              forces=results.get("forces", got.arrays.get("forces")))
            self._store(atoms, label)
        return True

    def _merge(self, selected: list[Atoms]) -> None:
        """``labelled.extxyz`` from the label files, in selection order, with the split."""
        ok, failed = [], []
        for atoms in selected:
            path = self._stored_label(atoms.info["frame_id"])
            if path.suffix == ".json":
                failed.append(json.loads(path.read_text()))
            else:
                ok.append(read(path, format="extxyz"))
        n_val = int(round(self.config.train.val_fraction * len(ok)))
        val = set(np.random.default_rng([self.config.seed, self.k]).permutation(len(ok))[:n_val].tolist())
        for i, atoms in enumerate(ok):
            atoms.info["split"] = "val" if i in val else "train"
        write_extxyz_atomically(self.rdir / "labelled.extxyz", ok)
        self.row.update(n_labelled=len(ok), n_failed=len(failed), failures=failed)

    # ---------------------------------------------------------------- train
    def train(self) -> None:
        from blip_ase.training import train
        from blip_ase.uq.evaluate import calibrate

        c, start = self.config, time.perf_counter()
        train_frames, val_frames = read_frames(c.train_data), read_frames(c.val_data)
        for k in range(1, self.k + 1):
            for atoms in _read_frames(self.out / f"round_{k}" / "labelled.extxyz"):
                (val_frames if atoms.info["split"] == "val" else train_frames).append(atoms)
        write_extxyz_atomically(self.rdir / "train_set.extxyz", train_frames)
        write_extxyz_atomically(self.rdir / "val_set.extxyz", val_frames)
        current = self.state["model"]
        train(train_config(c, current, self.k, self.device), self.rdir / "train_set.extxyz",
              self.rdir / "val_set.extxyz",
              self.rdir / "train", overwrite=True, init_checkpoint=current)
        model = self.rdir / "model.pt"
        if c.train.calibrate:
            result = calibrate(self.rdir / "train" / "model.pt", self.rdir / "val_set.extxyz", model,
                               n_samples=c.train.calibration_samples, seed=c.seed, overwrite=True, device=self.device)
            val = result["after"]
        else:
            shutil.copyfile(self.rdir / "train" / "model.pt", model)
            val = self._metrics(str(model), str(self.rdir / "val_set.extxyz"))
        self.row.update(n_train_total=len(train_frames), n_val_total=len(val_frames),
                        val_forces_mae=val["forces_mae"], val_forces_ece=val["forces_ece"],
                        seconds_train=time.perf_counter() - start)
        self.state["model"] = str(model)
        self._next_round()

    def _next_round(self) -> None:
        self.state["final"] = final_reason(self.config, self.k, self.state["labels_spent"])
        plot_report(self.out, self.state["rounds"])
        self.state["round"] = self.k + 1
        self.save("explore")
