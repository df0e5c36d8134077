"""The active-learning loop behind ``blip learn``: explore, select, label, fine-tune, round after round.

Layout of ``out``::

    state.json              the :class:`~blip_ase.active.state.LoopState`: round, stage, current model,
                            labels spent, report rows, and the run's settings (overrides and changes)
    report.csv, report.png  one row per round (see :mod:`blip_ase.active.report`)
    round_<k>/md/           the exploration (see :mod:`blip_ase.active.exploration`)
    round_<k>/flagged.extxyz    every walker's flagged frames, with walker, round, uncertainty, frame_id
    round_<k>/selected.extxyz   the frames chosen for labelling
    round_<k>/labels/           one file per oracle result (``<id>.extxyz`` or ``<id>.failed.json``),
                                written as each arrives; labels.log: one line per finished oracle call
    round_<k>/labelled.extxyz   the round's labels with provenance (round, walker, step,
                                uncertainty, oracle) and ``split`` (train or val)
    round_<k>/train/            the fine-tune (log.csv, uncalibrated model.pt)
    round_<k>/model.pt          the calibrated model of the round; metrics.json: the round's row

Every stage (:mod:`blip_ase.active.stages`) starts from what the previous one wrote and ends by
rewriting ``state.json``; a restart resumes the stage that was running, with the settings stored
in ``state.json`` (the command-line overrides of the first run included). Changing a stop limit
or ``oracle.workers`` on restart takes an explicit ``--max-rounds``/``--max-labels`` or
``accept_changes`` and is recorded in ``state.changes``; other settings cannot change.
"""

from __future__ import annotations

import time
from pathlib import Path

from ase.data import chemical_symbols

from blip_ase import interrupts
from blip_ase.active.config import LearnConfig
from blip_ase.active.oracle import check_oracle
from blip_ase.active.stages import STAGE_FUNCTIONS, Run, final_reason, train_config
from blip_ase.active.state import LoopState, read_state
from blip_ase.data.readers import frame_labels, read_frames
from blip_ase.training.config import with_overrides

RESTART_CHANGEABLE = ("stop", "oracle.workers", "oracle.dask_address")  # may change on restart, explicitly


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"stop": {"max_rounds": 2}}`` -> ``{"stop.max_rounds": 2}`` (mappings of other owners,
    ``explore.md``, ``oracle.kwargs``, ``train.config``, stay whole)."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("md", "kwargs", "config"):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def apply_overrides(config: LearnConfig, overrides: dict) -> LearnConfig:
    """``config`` with dotted ``overrides`` (``{"stop.max_rounds": 2}``) applied and checked."""
    nested: dict = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    return with_overrides(config, nested, "overrides")


def _changed(old: dict, new: dict) -> dict:
    a, b = flatten(old), flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _changeable(key: str) -> bool:
    return any(key == c or key.startswith(c + ".") for c in RESTART_CHANGEABLE)


def resume_settings(
    state: LoopState, config: LearnConfig | None, overrides: dict, *, accept_changes: bool, out: Path
) -> tuple[LearnConfig, LoopState]:
    """The settings a restart continues with: the stored ones, plus explicit changes (recorded).

    Args:
        state: the stored state. config: the config file given again (None: the stored one).
        overrides: new command-line overrides (explicit changes). accept_changes: apply changes
            of the stop limits or workers that ``config`` makes to the stored config file.

    Raises:
        ValueError: ``config`` changes a setting that cannot change, or changes a changeable one
            without ``accept_changes``.
    """
    source = state.source_config or state.config  # a state.json of before overrides were stored
    if config is None:
        config = LearnConfig.from_stored(source)
    file_changes = _changed(source, config.to_dict())
    fixed = [k for k in file_changes if not _changeable(k)]
    if fixed:
        raise ValueError(f"--restart with a config that changes {fixed}; only {list(RESTART_CHANGEABLE)} may change")
    if file_changes and not accept_changes:
        described = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in file_changes.items()))
        raise ValueError(
            f"the config file changes {described} of the run in {out}; resume it unchanged with "
            f"blip learn --out {out} --restart (the stored settings), or pass --accept-changes to apply the change"
        )
    merged = {**state.overrides, **overrides}
    effective = apply_overrides(config, merged)
    changes = _changed(state.config, effective.to_dict())
    state = state.replace(source_config=config.to_dict(), overrides=merged, config=effective.to_dict())
    if changes:
        record = {"round": state.round, "stage": state.stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "changed": changes}  # fmt: skip
        state = state.replace(changes=(*state.changes, record))
    return effective, state


def check_inputs(config: LearnConfig, out: Path, *, restart: bool, model: str | None = None) -> None:
    """Everything checked before any work.

    Raises:
        FileExistsError: ``out`` exists (not empty) without ``restart``.
        FileNotFoundError: a missing file.
        ValueError: an unusable model, structure, oracle or data file (named).
    """
    from blip_ase.active.exploration import uses_walkers
    from blip_ase.md.run import read_structure
    from blip_ase.models.checkpoint import load_checkpoint

    if not restart and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output directory {out} already exists; pass --restart to continue its loop")
    for name in ("train_data", "val_data", "test_data"):
        path = getattr(config, name)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{name} {path} does not exist")
        for k, atoms in enumerate(read_frames(path) if path is not None else []):
            frame_labels(atoms, where=f"{name} {path} frame {k}")  # ValueError: no energy or forces
    current = model or config.model
    potential, ckpt = load_checkpoint(current)
    known = [chemical_symbols[z] for z in potential.elements]
    config.explore.thresholds().resolve(ckpt.get("reference"), known, source=current)  # calibrated: needs its reference
    train_config(config, current, 1, None)  # train.config: unknown keys refused now, not after the labels
    if not potential.is_bayesian:
        raise ValueError(f"{current} is a deterministic model: the loop needs a BLIP model's uncertainty")
    structures = [read_structure(spec) for spec in config.explore.structures]
    check_oracle(config.oracle, structures)
    for spec, atoms in zip(config.explore.structures, structures):
        unknown = sorted(set(atoms.get_chemical_symbols()) - {chemical_symbols[z] for z in potential.elements})
        if unknown:
            raise ValueError(f"start structure {spec} has elements {unknown} the model {current} does not know")
    if config.select.strategy != "random" and not potential.implements_descriptors:
        raise ValueError(f"select.strategy {config.select.strategy} needs the model's descriptors (the "
                         f"{potential.backend} backend has none); use random")  # fmt: skip
    uses_walkers(config)  # engine: walkers with an ensemble a batch cannot run


def run_learn(
    config: LearnConfig | None, out: str | Path, *, max_rounds: int | None = None, max_labels: int | None = None,
    restart: bool = False, accept_changes: bool = False, device: str | None = None,
) -> LoopState:  # fmt: skip
    """Run (or, with ``restart``, continue) the loop until it stops or waits for external labels.

    Args:
        config: the loop (None with ``restart``: the settings stored in ``out``). out: its directory.
        max_rounds: overrides ``config.stop.max_rounds``; stored with the run, so a restart keeps
            it; given on a restart it changes the stored limit (recorded in ``state.changes``).
        max_labels: the same for ``config.stop.max_labels``.
        restart: continue the loop in ``out`` with its stored settings.
        accept_changes: on restart, apply the stop limits or workers that ``config`` changes.
        device: torch device of the MD, the fine-tunes and the metrics (None: CUDA if available).

    Returns:
        The final state; ``status`` is ``stopped`` (``stopped`` says why) or ``waiting``
        (external labels: ``waiting_for`` names the file).

    Raises:
        KeyboardInterrupt: Ctrl-C or SIGTERM (through ``blip learn``); ``state.json`` then says
            ``interrupted`` and the run can be restarted.
    """
    out = Path(out)
    overrides = {f"stop.{k}": v for k, v in (("max_rounds", max_rounds), ("max_labels", max_labels)) if v is not None}
    if restart:
        state = read_state(out)
        config, state = resume_settings(state, config, overrides, accept_changes=accept_changes, out=out)
        check_inputs(config, out, restart=True, model=state.model)
    else:
        if config is None:
            raise ValueError("a learn config is needed to start a loop (only --restart continues without one)")
        source, config = config, apply_overrides(config, overrides)
        check_inputs(config, out, restart=False)
        n_start = len(read_frames(config.train_data)) + len(read_frames(config.val_data))
        out.mkdir(parents=True, exist_ok=True)
        state = LoopState(config=config.to_dict(), source_config=source.to_dict(), overrides=overrides,
                          model=str(config.model), n_start_labels=n_start)  # fmt: skip
    state = state.replace(status="running", waiting_for=None, signal=None)
    if state.stage == "explore":  # a restart may raise max_rounds or max_labels
        state = state.replace(final=final_reason(config, state.round - 1, state.labels_spent))
    run = Run(config, out, device)
    state = run.save(state)  # a kill before the first stage ends can be restarted
    try:
        while state.status == "running":
            interrupts.raise_pending()  # a signal whose exception Python swallowed (blip_ase.interrupts)
            run.rdir(state).mkdir(exist_ok=True)
            state = STAGE_FUNCTIONS[state.stage](run, state)
    except KeyboardInterrupt as exc:
        import signal

        signum = getattr(exc, "signum", signal.SIGINT)
        run.save(read_state(out).replace(status="interrupted", signal=signal.Signals(signum).name))
        raise
    return state
