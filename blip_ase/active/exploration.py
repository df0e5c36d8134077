"""The exploration of a round: monitored MD of every walker, one ``blip md`` run after another or
all walkers as one batch (``blip md --walkers``), and the pool of their flagged frames.

Walker ``w`` of round ``k`` is the ``w``-th (structure, temperature) pair (structures outermost)
with seed ``seed + 1000 k + w`` in either engine. Files: ``round_<k>/md/walker_<w>/`` (serial) or
``round_<k>/md/`` (batched: one ``summary.json`` with an entry per walker).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read

from blip_ase.active.config import LearnConfig
from blip_ase.active.state import Interrupted

FINISHED = ("completed", "halted", "failed")


def _flagged(path: Path) -> list[Atoms]:
    return read(path, ":", format="extxyz") if path.is_file() and path.stat().st_size else []


def _signum(summary: dict) -> int:
    import signal

    return int(signal.Signals[summary.get("signal") or "SIGINT"])


def _tag(atoms: Atoms, k: int, w: int, temperature_K: float) -> Atoms:
    step = int(atoms.info["step"])
    atoms.info.update(frame_id=f"r{k}w{w}s{step}", round=k, walker=w, temperature_K=temperature_K,
                      uncertainty=float(np.sqrt(np.max(atoms.arrays["blip_forces_variance"]))))  # fmt: skip
    return atoms


def walkers_config(config: LearnConfig, rdir: Path, model: str, k: int, device: str | None):
    """The :class:`~blip_ase.md.walkers.WalkersConfig` of round ``k``'s batched exploration.

    Raises:
        ValueError: the MD settings cannot run as a batch (e.g. a Nose-Hoover or NPT ensemble).
    """
    from blip_ase.md.walkers import WalkersConfig

    walkers = config.explore.walkers
    specs = tuple(f"{s}@0" if Path(s).exists() else s for s, _ in walkers)  # one frame each, as blip md reads it
    md = config.explore.md_config(model=model, structure=specs[0], out=str(rdir / "md"), temperature_K=walkers[0][1],
                                  seed=config.seed + 1000 * k, overwrite=True,
                                  **({} if device is None else {"device": device}))  # fmt: skip
    return WalkersConfig(md=md, n_walkers=len(walkers), temperatures_K=tuple(T for _, T in walkers), structures=specs)


def uses_walkers(config: LearnConfig) -> bool:
    """Whether the exploration runs batched: ``engine: walkers``, or ``auto`` with two walkers or
    more whose MD settings a batch can run.

    Raises:
        ValueError: ``engine: walkers`` with settings a batch cannot run (named).
    """
    engine = config.explore.engine
    if engine == "serial" or (engine == "auto" and len(config.explore.walkers) < 2):
        return False
    try:
        walkers_config(config, Path("."), config.model, 1, None)
    except ValueError as exc:
        if engine == "walkers":
            raise ValueError(f"explore.engine walkers: {exc}") from None
        return False
    return True


def run_exploration(
    config: LearnConfig, rdir: Path, model: str, k: int, *, device: str | None = None
) -> tuple[list[dict], list[Atoms]]:
    """Run (or finish) round ``k``'s exploration with ``model``.

    Returns:
        One summary per walker (``status``, ``final_step``, ``n_checked``, ``n_flagged``) and the
        flagged frames, tagged with ``frame_id``, ``round``, ``walker``, ``temperature_K`` and
        ``uncertainty`` (the largest per-atom force std, eV/A).

    Raises:
        KeyboardInterrupt: a walker was interrupted (Ctrl-C, SIGTERM): the loop stops, not the walker only.
    """
    if uses_walkers(config):
        return _batched(config, rdir, model, k, device)
    return _serial(config, rdir, model, k, device)


def _serial(config: LearnConfig, rdir: Path, model: str, k: int, device: str | None):
    from blip_ase.md import run_md
    from blip_ase.md.run import MDRunFailed

    summaries, pool = [], []
    for w, (structure, T) in enumerate(config.explore.walkers):
        wdir = rdir / "md" / f"walker_{w}"
        done = wdir / "summary.json"
        summary = json.loads(done.read_text()) if done.is_file() else {}
        if summary.get("status") not in FINISHED:
            md = config.explore.md_config(model=model, structure=structure, out=str(wdir), temperature_K=T,
                                          seed=config.seed + 1000 * k + w, overwrite=True,
                                          **({} if device is None else {"device": device}))  # fmt: skip
            try:
                summary = run_md(md)
            except MDRunFailed:  # an exploding system ends the walker like a halt
                summary = json.loads(done.read_text())
            if summary["status"] == "interrupted":
                raise Interrupted(_signum(summary), f"walker {w} interrupted at step {summary['final_step']}")
        summaries.append(summary)
        pool += [_tag(a, k, w, T) for a in _flagged(wdir / "flagged.extxyz")]
    return summaries, pool


def _batched(config: LearnConfig, rdir: Path, model: str, k: int, device: str | None):
    from blip_ase.md.run import MDRunFailed
    from blip_ase.md.walkers import run_walkers

    done = rdir / "md" / "summary.json"
    summary = json.loads(done.read_text()) if done.is_file() else {}
    if summary.get("status") not in FINISHED:  # a batch cannot resume: run it again whole
        try:
            summary = run_walkers(walkers_config(config, rdir, model, k, device))
        except MDRunFailed:
            summary = json.loads(done.read_text())
        if summary["status"] == "interrupted":
            raise Interrupted(_signum(summary), f"the walkers were interrupted at step {summary['final_step']}")
    temperatures = [T for _, T in config.explore.walkers]
    summaries = []
    for entry in summary["walkers"]:
        steps = summary["final_step"] if entry.get("halt_step") is None else entry["halt_step"]
        summaries.append({"status": entry["status"], "final_step": steps, "n_checked": entry["n_checked"],
                          "n_flagged": entry["n_flagged"]})  # fmt: skip
    pool = [_tag(a, k, int(a.info["walker"]), temperatures[int(a.info["walker"])])
            for a in _flagged(rdir / "md" / "flagged.extxyz")]  # fmt: skip
    return summaries, pool
