"""Signals that stop a run, delivered even where Python swallows a handler's exception.

A signal handler's exception is raised wherever the interpreter happens to be. Inside a
``__del__`` method or a weakref callback (garbage collection) Python prints it as "Exception
ignored" and goes on, so a Ctrl-C or SIGTERM would be lost and the run would finish as if nothing
had happened. The handlers made here also record the signal, and long loops (every MD step, every
stage of ``blip learn``) call :func:`raise_pending` at a safe point, which raises it again there.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

_pending: list[int] = []


class SignalInterrupt(KeyboardInterrupt):
    """A recorded signal raised again at a safe point; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def handler(exc_type: Callable[[int], BaseException]) -> Callable:
    """A signal handler that records the signal and raises ``exc_type(signum)``."""

    def interrupt(signum, frame):
        _pending.append(int(signum))
        raise exc_type(signum)

    return interrupt


def raise_pending() -> None:
    """Raise the last recorded signal (and forget them all) if one is recorded."""
    if _pending:
        signum = _pending[-1]
        _pending.clear()
        raise SignalInterrupt(signum)


def clear() -> None:
    """Forget recorded signals (the interrupt has been handled)."""
    _pending.clear()
