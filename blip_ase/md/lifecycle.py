"""One run lifecycle for :func:`~blip_ase.md.run.run_md` and
:func:`~blip_ase.md.walkers.run_walkers`: output directory, summary rewrites, interrupt, failure,
final summary and plot.

A run checks its output directory before creating anything (:func:`check_output`), creates it
(:func:`prepare_output`), then hands its step loop to :meth:`RunLifecycle.run`: Ctrl-C or
:class:`Interrupted` (SIGTERM through ``blip md``) ends it with ``status: "interrupted"``, the
signal in ``signal`` and ``stop_reason``; any other exception writes ``status: "failed"`` with
the error and raises :class:`MDRunFailed`. :meth:`RunLifecycle.finish` writes the final summary
and the plot. ``summary.json`` is strict JSON, rewritten during the run.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from blip_ase import interrupts
from blip_ase.md.config import MDConfig
from blip_ase.strict_json import write_json


class Interrupted(KeyboardInterrupt):
    """Raised by a signal handler to stop a run cleanly; ``signum`` is recorded."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class MDRunFailed(RuntimeError):
    """The dynamics raised after the run had started; ``summary.json`` says ``failed``."""


def check_output(config: MDConfig, *, restartable: bool = True) -> Path:
    """The output directory, checked (nothing is created here); ``restartable=False`` for runs that
    cannot be restarted (batched walkers), whose message then offers ``--overwrite`` only.

    Raises:
        FileExistsError: ``out`` holds files and neither ``overwrite`` nor ``restart`` is set, or
            is a file.
        FileNotFoundError: ``restart`` without a trajectory to restart from.
    """
    out = Path(config.out)
    if config.restart:
        if not (out / "md.traj").is_file():
            raise FileNotFoundError(f"cannot restart: {out / 'md.traj'} does not exist")
        return out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(
            f"output directory {out} already exists; pass --overwrite{' or --restart' if restartable else ''}"
        )
    return out


def prepare_output(config: MDConfig, files: Iterable[str], *, restartable: bool = True) -> Path:
    """Create the output directory (removing an earlier run's ``files``, glob patterns, with
    ``overwrite``; nothing with ``restart``).

    Raises:
        FileExistsError, FileNotFoundError: as :func:`check_output`.
    """
    out = check_output(config, restartable=restartable)
    if not config.restart:
        if out.is_dir():
            for pattern in files:
                for old in out.glob(pattern):
                    old.unlink()
        out.mkdir(parents=True, exist_ok=True)
    return out


class RunLifecycle:
    """Summary, interrupt, failure and plot of one started run.

    Args:
        out: the created output directory.
        info: the run's description, in every summary (``error`` and ``signal`` are added here).
        state: ``state(wall_seconds)`` -> the run's live summary fields (counts, steps, timings).
        step: the current step (for messages).
        summary_every_s: minimum seconds between rewrites of ``summary.json`` by :meth:`tick`.
    """

    def __init__(
        self,
        out: Path,
        info: dict,
        *,
        state: Callable[[float], dict],
        step: Callable[[], int],
        summary_every_s: float,
    ):
        self.out, self.info, self.state, self.step = out, info, state, step
        self.summary_every_s = summary_every_s
        self.started = time.perf_counter()
        self.last_write = -np.inf

    def write(self, status: str) -> dict:
        """Write and return ``summary.json`` with ``status``."""
        summary = {"status": status, **self.info, **self.state(time.perf_counter() - self.started)}
        if "signal" in self.info:
            summary["stop_reason"] = f"step {self.step()}: interrupted by {self.info['signal']}"
        write_json(self.out / "summary.json", summary)
        return summary

    def tick(self, *, now: bool = False) -> None:
        """Rewrite the running summary when ``now`` or ``summary_every_s`` have passed."""
        clock = time.perf_counter()
        if now or clock - self.last_write >= self.summary_every_s:
            self.write("running")
            self.last_write = clock

    def run(self, loop: Callable[[], None], *, cleanup: Callable[[], None]) -> str:
        """Run ``loop()``; returns ``"completed"`` or ``"interrupted"``; ``cleanup()`` always runs.

        Raises:
            MDRunFailed: ``loop`` raised (the summary says ``failed`` with the error).
        """
        status = "completed"
        try:
            loop()
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the CLI's handler (Interrupted)
            interrupts.clear()
            status = "interrupted"
            self.info["signal"] = signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
        except Exception as exc:  # e.g. an exploding system: keep a truthful summary, then report it
            self.info["error"] = f"{type(exc).__name__}: {exc}"
            self.write("failed")
            raise MDRunFailed(
                f"the run failed at step {self.step()}: {self.info['error']} (summary in {self.out / 'summary.json'})"
            ) from exc
        finally:
            cleanup()
        return status

    def finish(self, status: str, plot: Callable[[Path, dict], None] | None = None) -> dict:
        """Write the final summary and (``plot(path, summary)``) ``uncertainty.png``; returns the summary."""
        summary = self.write(status)
        if plot is not None:
            plot(self.out / "uncertainty.png", summary)
        return summary
