"""Restart rules of ``blip md --restart``: the stored run wins.

A restart continues the run in ``out`` from the last frame of ``md.traj`` with the configuration
stored in ``out/summary.json`` (model, ensemble, temperature, thresholds, seed, ...), whatever
the defaults of the restarting command are. Only :data:`CHANGEABLE_ON_RESTART` may be given
new values; any other setting that is given and contradicts the stored one is refused (before:
``--restart`` silently continued a 1200 K run at the 300 K default, and ``--ensemble nve``
switched the integrator mid-run).

Ensembles with a deterministic thermostat or barostat state (Nose-Hoover chains, MTK) are not
restartable: ASE keeps that state inside the integrator and ``md.traj`` does not hold it, so a
restart would silently reset it. They are refused with a message saying so.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import fields, replace
from pathlib import Path

from blip_ase.md.config import MDConfig

CHANGEABLE_ON_RESTART = (
    "steps", "traj_interval", "uq_interval", "uq_max_interval", "uq_quiet_ratio", "progress", "plot", "device",
    "summary_every_s",
)  # fmt: skip
NOT_RESTARTABLE = ("nvt-nose-hoover", "npt-mtk-isotropic", "npt-mtk")
_BOOKKEEPING = ("out", "restart", "overwrite")


def read_stored_config(out: Path) -> MDConfig:
    """The configuration stored by the run in ``out`` (``summary.json``, key ``config``).

    Raises:
        FileNotFoundError: no ``summary.json``. ValueError: it holds no readable configuration.
    """
    path = Path(out) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"cannot restart: {path} does not exist (it holds the run's configuration)")
    try:
        summary = json.loads(path.read_text())
        stored = dict(summary["config"])
        stored.setdefault("thresholds", summary.get("thresholds", {}))
        stored.update(out=str(out), restart=False, overwrite=False)
        return MDConfig.from_dict(stored)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot restart: {path} holds no readable run configuration ({exc})") from exc


OPTION_NAMES = {  # MDConfig field -> how blip md sets it (None: no option; Python only)
    "thresholds": "the threshold options",
    "physical": "the physical-check options",
    "progress": "--no-progress",
    "plot": "--no-plot",
    "summary_every_s": None,
}


def option_name(field_name: str) -> str | None:
    """The ``blip md`` option of an :class:`MDConfig` field, for messages (None: it has none)."""
    return OPTION_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def _same(name: str, a, b) -> bool:
    if name == "model" and a is not None and b is not None:  # the stored path is absolute
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def restart_config(requested: MDConfig, stored: MDConfig, given: Collection[str] | None = None) -> MDConfig:
    """The configuration of a restart: ``stored``, with the changeable fields of ``requested``.

    Args:
        requested: the restarting call's configuration (``restart=True``).
        stored: the run's configuration (:func:`read_stored_config`).
        given: fields the caller set explicitly; None = those differing from :class:`MDConfig`'s
            defaults.

    Raises:
        ValueError: the stored ensemble cannot be restarted, or a given field other than
            :data:`CHANGEABLE_ON_RESTART` contradicts the stored run.
    """
    if stored.ensemble in NOT_RESTARTABLE:
        raise ValueError(
            f"cannot restart a {stored.ensemble} run: ASE keeps its thermostat/barostat state inside the "
            "integrator and md.traj does not store it, so a restart would not continue the same dynamics; "
            f"start a new run from the last frame instead (--structure {Path(requested.out) / 'md.traj'}@-1, "
            "new velocities)"
        )
    defaults = MDConfig()
    names = [f.name for f in fields(MDConfig) if f.name not in _BOOKKEEPING]
    if given is None:
        given = [n for n in names if getattr(requested, n) != getattr(defaults, n)]
    conflicts = [
        f"{option_name(n) or n} {getattr(requested, n)!r} (the run has {getattr(stored, n)!r})"
        for n in names
        if n in given and n not in CHANGEABLE_ON_RESTART and not _same(n, getattr(requested, n), getattr(stored, n))
    ]
    if conflicts:
        allowed = ", ".join(option_name(n) for n in CHANGEABLE_ON_RESTART if option_name(n))
        raise ValueError(
            "--restart continues the stored run with its own settings; these contradict it: "
            + "; ".join(conflicts)
            + f". Only {allowed} may change (or start a new run with another --out)"
        )
    return replace(stored, out=requested.out, restart=True, **{n: getattr(requested, n) for n in CHANGEABLE_ON_RESTART})
