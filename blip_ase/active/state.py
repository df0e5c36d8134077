"""The loop's state: :class:`LoopState`, stored as ``state.json`` in the run directory.

The state is a frozen dataclass; each stage function (:mod:`blip_ase.active.stages`) takes one and
returns the next. It records the settings of the run as well as its progress: ``config`` (the
settings in effect, command-line overrides applied), ``source_config`` (the configuration file
as given), ``overrides`` (the command-line overrides, e.g. ``{"stop.max_rounds": 2}``) and
``changes`` (every change a restart made, with the round and stage it was made at), so that
``blip learn --out DIR --restart`` resumes exactly the run that was stopped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Stage = Literal["explore", "select", "label", "train"]
Status = Literal["running", "waiting", "stopped", "interrupted"]
STAGES: tuple[str, ...] = ("explore", "select", "label", "train")


@dataclass(frozen=True)
class LoopState:
    """Where the loop is and what it has done.

    Attributes:
        status: ``running`` (also after a kill, which cannot be recorded), ``waiting`` (for
            external labels: ``waiting_for``), ``stopped`` (``stopped`` says why) or
            ``interrupted`` (Ctrl-C or SIGTERM: ``signal``).
        round: the round in progress (1-based). stage: its stage in progress.
        final: why the next exploration is the last (it only tests the model), or None.
        model: the checkpoint the loop continues from.
        labels_spent: oracle calls so far (failures count).
        n_start_labels: labelled frames of the starting training and validation data.
        rounds: one report row per round (see :mod:`blip_ase.active.report`).
        config, source_config, overrides, changes: the run's settings (module docstring).
    """

    config: dict
    model: str
    status: Status = "running"
    round: int = 1
    stage: Stage = "explore"
    final: str | None = None
    labels_spent: int = 0
    n_start_labels: int = 0
    stopped: str | None = None
    waiting_for: str | None = None
    signal: str | None = None
    rounds: tuple[dict, ...] = ()
    source_config: dict | None = None
    overrides: dict = field(default_factory=dict)
    changes: tuple[dict, ...] = ()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r} in the loop state; known: {list(STAGES)}")
        object.__setattr__(self, "rounds", tuple(self.rounds))
        object.__setattr__(self, "changes", tuple(self.changes))

    @property
    def row(self) -> dict:
        """A copy of the current round's report row (``{"round": k}`` when it has none yet)."""
        if self.rounds and self.rounds[-1]["round"] == self.round:
            return dict(self.rounds[-1])
        return {"round": self.round}

    def with_row(self, **fields) -> LoopState:
        """This state with the current round's row updated by ``fields``."""
        row = self.row | fields
        rows = self.rounds[:-1] if self.rounds and self.rounds[-1]["round"] == self.round else self.rounds
        return dataclasses.replace(self, rounds=(*rows, row))

    def replace(self, **fields) -> LoopState:
        return dataclasses.replace(self, **fields)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "state.json") -> LoopState:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: unknown keys or values (a state.json of another version or edited by hand).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}: not a blip learn run of this version")
        return cls(**data)


def read_state(out: Path) -> LoopState:
    """``out/state.json``.

    Raises:
        FileNotFoundError: nothing to restart from. ValueError: not a loop state.
    """
    path = Path(out) / "state.json"
    if not path.is_file():
        raise FileNotFoundError(f"cannot restart: {path} does not exist (start without --restart)")
    return LoopState.from_dict(json.loads(path.read_text()), where=str(path))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM that stops the loop; ``signum`` says which."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"signal {signum}")
        self.signum = int(signum)
