"""``blip md``: uncertainty-monitored NVE/NVT/NPT molecular dynamics with flagged-frame export.

Thin over :func:`blip_ase.md.run_md`: parses options into an :class:`~blip_ase.md.MDConfig`.
"""

from __future__ import annotations

import argparse
import sys

from blip_ase.cli.compute import add_compute_options
from blip_ase.md.config import MDConfig
from blip_ase.md.policy import DEFAULT_THRESHOLDS

HELP = "run uncertainty-monitored molecular dynamics (MAP forces, Monte Carlo uncertainty every k steps)"

EPILOG = """\
Outputs in --out: md.traj (ASE trajectory, restart point), md.log, flagged.extxyz and flagged.h5
(frames above the flag threshold, with blip_energy, blip_forces, blip_forces_variance,
blip_energy_variance, step, time, reason, flagged_atoms), uncertainty.csv and uncertainty.png
(history and plot), summary.json (counts, thresholds, stop reason, timings). A frame above a halt
threshold is exported and stops the run at that step (summary status "halted"); so does a frame
whose prediction or uncertainty is not finite (NaN or inf: reason "non-finite prediction"), and
one that fails a physical check, which the model's uncertainty cannot see (an isolated atom has
zero force std): "fragmented" (a molecule's bond graph split, or an atom with no neighbour within
the model cutoff), "too_close", "temperature_runaway", "energy_jump". summary.json "stop_check"
and the "check" column of uncertainty.csv name the check that stopped the run.

Exit codes: 0 completed or halted (summary.json "status" tells which), 1 failed during the run
(status "failed", the error in summary.json), 2 bad input (nothing is created), 130 interrupted by
Ctrl-C (SIGINT), 143 interrupted by SIGTERM (status "interrupted", the signal in "signal" and
"stop_reason"). md.traj always ends with the last frame: --restart continues from it.
"""

EXIT_OK = 0  # completed or halted
EXIT_FAILED = 1  # the dynamics raised after the start
EXIT_BAD_INPUT = 2  # raised before anything was created (blip_ase.cli.main's error exit)

D = MDConfig()  # every default but the thresholds' (blip_ase.md.DEFAULT_THRESHOLDS, calibrated units)


class _Default(float):
    """A default value of a threshold option, told apart from the same number given on the command line."""


class _Unset:
    """The default of an absolute threshold option: not given (the calibrated threshold applies)."""

    def __str__(self) -> str:
        return "unset: the calibrated threshold"


UNSET = _Unset()


def _element_threshold(text: str) -> tuple[str, tuple[float | None, float | None]]:
    """``"H=0.2,1.0"`` -> ``("H", (0.2, 1.0))``; ``"H=0.2"`` leaves halt off."""
    try:
        symbol, values = text.split("=", 1)
        parts = [float(v) if v.strip().lower() not in ("", "none") else None for v in values.split(",")]
        if not 1 <= len(parts) <= 2:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SYMBOL=FLAG[,HALT] (eV/A), got {text!r}") from None
    return symbol.strip(), (parts[0], parts[1] if len(parts) == 2 else None)


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "off") else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register every ``blip md`` option (the formatter appends each default to its help)."""
    parser.epilog = EPILOG
    _add_io(parser.add_argument_group("input and output"))
    _add_dynamics(parser.add_argument_group("dynamics"))
    _add_monitor(parser.add_argument_group("uncertainty monitor (a threshold given as 'none' is off)"))
    _add_physical(parser.add_argument_group("physical checks, each halting with its own reason ('none' is off)"))
    _add_walkers(parser.add_argument_group("many walkers in one batched pass (torch-sim)"))
    add_compute_options(parser)


def _add_io(group) -> None:
    group.add_argument("--model", default=None, help="BLIP checkpoint; None = the shipped ammonia model")
    group.add_argument(
        "--structure",
        nargs="+",
        default=None,
        help="starting structure, any ase.io format: FILE (first frame) or FILE@INDEX (e.g. md_out/md.traj@-1); "
        "None = the shipped NH3 geometry. With --walkers: one or more files, every frame of each (FILE@INDEX or "
        "FILE@A:B picks frames) is a start structure, walker k starts from start k modulo their number",
    )
    group.add_argument("--out", default=D.out, help="output directory")
    group.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    group.add_argument(
        "--restart",
        action="store_true",
        help="continue the run in --out from the last frame of md.traj up to --steps steps in total, with the "
        "run's stored settings (only --steps, --traj-interval, the --uq-* schedule and display/compute options may "
        "change; a contradicting option is refused; Nose-Hoover and MTK runs cannot be restarted)",
    )
    group.add_argument(
        "--traj-interval", type=int, default=D.traj_interval, help="steps between trajectory and log frames"
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--no-plot", action="store_true", help="do not write uncertainty.png")


_DYNAMICS_OPTIONS = (  # (option, MDConfig field, help) of the float settings of make_dynamics
    ("--timestep-fs", "timestep_fs", "time step (fs)"),
    ("--temperature-K", "temperature_K", "thermostat temperature (K); with --walkers a list, one per walker"),
    ("--pressure-bar", "pressure_bar", "barostat pressure (bar), NPT only"),
    ("--friction-per-fs", "friction_per_fs", "Langevin friction (1/fs)"),
    ("--tdamp-fs", "tdamp_fs", "thermostat time constant (fs): Bussi, Nose-Hoover, MTK, Berendsen"),
    ("--pdamp-fs", "pdamp_fs", "barostat time constant (fs): MTK, Berendsen"),
    ("--compressibility-per-bar", "compressibility_per_bar", "NPTBerendsen compressibility (1/bar)"),
)


def _add_dynamics(group) -> None:
    from blip_ase.md.dynamics import ENSEMBLES

    group.add_argument(
        "--ensemble",
        choices=ENSEMBLES,
        default=D.ensemble,
        help="integrator: nve = VelocityVerlet, nvt-langevin, nvt-bussi, nvt-nose-hoover = NoseHooverChainNVT, "
        "npt-mtk-isotropic = IsotropicMTKNPT, npt-mtk = MTKNPT, npt-berendsen = NPTBerendsen",
    )
    group.add_argument("--steps", type=int, default=D.steps, help="total number of MD steps")
    for option, name, text in _DYNAMICS_OPTIONS:
        kind = _temperatures if name == "temperature_K" else float
        group.add_argument(option, type=kind, default=getattr(D, name), help=text)
    group.add_argument(
        "--init-temperature-K",
        type=_optional_float,
        default=D.init_temperature_K,
        help="temperature of the initial Maxwell-Boltzmann velocities (K); None = --temperature-K",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=D.seed,
        help="seed of the initial velocities, the Langevin/Bussi noise and the MC noise",
    )


def _add_walkers(group) -> None:
    group.add_argument(
        "--walkers",
        type=int,
        default=None,
        metavar="N",
        help="run N walkers as one batch on torch-sim (nve or nvt-langevin): walker k has seed --seed + k, "
        "--temperature-K may list one temperature per walker (300,600,...), the thresholds apply per walker, a "
        "halted walker leaves the batch; outputs carry a walker id (see blip_ase.md.walkers). Not restartable",
    )
    group.add_argument(
        "--respawn",
        action="store_true",
        help="with --walkers: restart a halted walker from its start structure with a new seed instead of removing it",
    )


def _temperatures(text: str) -> float | tuple[float, ...]:
    """``"300"`` -> 300.0; ``"300,600"`` -> (300.0, 600.0) (one per walker, with --walkers)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a temperature (K) or a comma-separated list: {text!r}") from None
    return values[0] if len(values) == 1 else values


def _add_monitor(group) -> None:
    group.add_argument("--n-samples", type=int, default=D.n_samples, help="Monte Carlo samples per uncertainty check")
    group.add_argument("--uq-interval", type=int, default=D.uq_interval, help="steps between uncertainty checks")
    group.add_argument(
        "--uq-max-interval",
        type=int,
        default=D.uq_max_interval,
        help="adaptive checks: after a check far below the flag threshold (every atom's std under "
        "--uq-quiet-ratio of its limit) the gap to the next doubles, up to this many steps (unset: 4 x "
        "--uq-interval; equal to --uq-interval: a fixed schedule); any other check goes back to --uq-interval",
    )
    group.add_argument(
        "--uq-quiet-ratio",
        type=float,
        default=D.uq_quiet_ratio,
        help="with --uq-max-interval: the fraction of the flag threshold below which a check lets the gap grow",
    )
    T = DEFAULT_THRESHOLDS
    group.add_argument(
        "--flag-calibrated",
        type=_optional_float,
        default=_Default(T.calibrated_flag),
        metavar="K",
        help="export frames where an atom's force std is above K times the --calibrated-quantile (q99) of the "
        "per-atom force errors blip calibrate measured for its element (stored in the checkpoint); a model "
        "without them needs blip calibrate or the eV/A options",
    )
    group.add_argument(
        "--halt-calibrated",
        type=_optional_float,
        default=_Default(T.calibrated_halt),
        metavar="K",
        help="stop at the first checked frame where an atom's force std is above K times the q99 of the per-atom "
        "force errors of its element on the calibration data",
    )
    group.add_argument(
        "--calibrated-quantile",
        type=float,
        default=T.calibrated_quantile,
        help="quantile level of the calibrated thresholds: 0.5, 0.9, 0.95, 0.99 or 1.0 (what blip calibrate stores)",
    )
    group.add_argument(
        "--no-screen",
        action="store_true",
        help="draw Monte Carlo samples at every check; otherwise the model's uncertainty screen (fitted by blip "
        "calibrate) clears a check without samples when its bound on every atom's force std is below the flag",
    )
    group.add_argument(
        "--screen-anchor-steps",
        type=int,
        default=D.screen_anchor_steps,
        help="steps after a check with samples during which the screen may also clear a check when 1.5 x that "
        "check's measured std, scaled by the change of the screen's bound since, stays below the flag (0: off)",
    )
    group.add_argument(
        "--flag-force-std-eV-per-A",
        type=_optional_float,
        default=UNSET,
        help="absolute flag threshold on the max per-atom force std (eV/A), instead of --flag-calibrated",
    )
    group.add_argument(
        "--halt-force-std-eV-per-A",
        type=_optional_float,
        default=UNSET,
        help="absolute halt threshold on the max per-atom force std (eV/A), instead of --halt-calibrated",
    )
    group.add_argument(
        "--flag-relative", type=_optional_float, default=None, help="flag threshold on max_i std_i / (|F_i| + nu)"
    )
    group.add_argument(
        "--halt-relative", type=_optional_float, default=None, help="halt threshold on max_i std_i / (|F_i| + nu)"
    )
    group.add_argument(
        "--relative-nu-eV-per-A",
        type=float,
        default=D.thresholds.relative_nu,
        help="nu of the relative force std (eV/A)",
    )
    group.add_argument(
        "--flag-energy-std-eV-per-atom",
        type=_optional_float,
        default=None,
        help="flag threshold on the energy std per atom (eV/atom)",
    )
    group.add_argument(
        "--halt-energy-std-eV-per-atom",
        type=_optional_float,
        default=None,
        help="halt threshold on the energy std per atom (eV/atom)",
    )
    group.add_argument(
        "--element-threshold",
        type=_element_threshold,
        action="append",
        default=None,
        metavar="SYMBOL=FLAG[,HALT]",
        help="force-std thresholds (eV/A) for one element, replacing the global ones; repeatable",
    )


def _add_physical(group) -> None:
    p = D.physical
    group.add_argument(
        "--bond-factor",
        type=_optional_float,
        default=p.bond_factor,
        help="fragmented: atoms are bonded below this times the sum of their covalent radii; halt when a "
        "molecule's bond graph splits relative to the start structure",
    )
    group.add_argument(
        "--no-isolated-check",
        action="store_true",
        help="do not halt (fragmented) when an atom has no neighbour within the model cutoff",
    )
    group.add_argument(
        "--min-distance-factor",
        type=_optional_float,
        default=p.min_distance_factor,
        help="too_close: halt when two atoms are closer than this times the sum of their covalent radii",
    )
    group.add_argument(
        "--runaway-temperature-factor",
        type=_optional_float,
        default=p.temperature_factor,
        help="temperature_runaway: halt when T is above this times --temperature-K ...",
    )
    group.add_argument(
        "--runaway-checks", type=int, default=p.temperature_checks, help="... at this many consecutive checks"
    )
    group.add_argument(
        "--energy-jump-eV-per-atom",
        type=_optional_float,
        default=p.energy_jump_eV_per_atom,
        help="energy_jump: halt when the total energy per atom changes by more than this between two checks",
    )
    group.add_argument("--no-physical-checks", action="store_true", help="switch every physical check off")


_PHYSICAL_FIELDS = {  # blip md option (argparse dest) -> PhysicalChecks field
    "bond_factor": "bond_factor",
    "no_isolated_check": "isolated",
    "min_distance_factor": "min_distance_factor",
    "runaway_temperature_factor": "temperature_factor",
    "runaway_checks": "temperature_checks",
    "energy_jump_eV_per_atom": "energy_jump_eV_per_atom",
    "no_physical_checks": "physical",
}


_THRESHOLD_FIELDS = {  # blip md option (argparse dest) -> Thresholds field
    "flag_force_std_eV_per_A": "force_std_flag",
    "halt_force_std_eV_per_A": "force_std_halt",
    "flag_calibrated": "calibrated_flag",
    "halt_calibrated": "calibrated_halt",
    "calibrated_quantile": "calibrated_quantile",
    "flag_relative": "relative_flag",
    "halt_relative": "relative_halt",
    "relative_nu_eV_per_A": "relative_nu",
    "flag_energy_std_eV_per_atom": "energy_std_flag",
    "halt_energy_std_eV_per_atom": "energy_std_halt",
    "element_threshold": "per_element",
}
# option -> MDConfig field it switches off
_NEGATED = {"no_progress": "progress", "no_plot": "plot", "no_screen": "screen"}
_FIELD_OF_OPTION = {
    **_NEGATED,
    **dict.fromkeys(_THRESHOLD_FIELDS, "thresholds"),
    **dict.fromkeys(_PHYSICAL_FIELDS, "physical"),
}


def config_from_args(args: argparse.Namespace):
    """The :class:`~blip_ase.md.MDConfig` described by parsed ``blip md`` options (every option
    whose name is a field of MDConfig maps onto it; see ``_THRESHOLD_FIELDS`` and ``_NEGATED``)."""
    from dataclasses import fields

    from blip_ase.md import MDConfig, PhysicalChecks, Thresholds

    values = dict(vars(args))
    _walker_settings(values)  # a list of temperatures or structures is for --walkers only
    thresholds = {field: values[option] for option, field in _THRESHOLD_FIELDS.items()}
    thresholds["per_element"] = dict(thresholds["per_element"] or [])
    _absolute_or_calibrated(thresholds)
    config = {f.name: values[f.name] for f in fields(MDConfig) if f.name in values}
    config.update({field: not values[option] for option, field in _NEGATED.items()})
    physical = {field: values[option] for option, field in _PHYSICAL_FIELDS.items() if field != "physical"}
    physical["isolated"] = not physical["isolated"]
    config["physical"] = PhysicalChecks(**physical, enabled=not values["no_physical_checks"])
    return MDConfig(**config, thresholds=Thresholds(**thresholds))


def _absolute_or_calibrated(thresholds: dict) -> None:
    """Settle each level's force-std threshold in place: an absolute one given on the command line
    switches the calibrated default of its level off; both given is left to Thresholds to refuse."""
    for level in ("flag", "halt"):
        absolute, calibrated = f"force_std_{level}", f"calibrated_{level}"
        if thresholds[absolute] is UNSET:
            thresholds[absolute] = None
        elif type(thresholds[calibrated]) is _Default:
            thresholds[calibrated] = None
        if type(thresholds[calibrated]) is _Default:
            thresholds[calibrated] = float(thresholds[calibrated])


def _walker_settings(values: dict) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """Split the per-walker lists off ``values`` (in place: ``temperature_K`` and ``structure``
    keep their first entry, as MDConfig holds one) and return them.

    Raises:
        ValueError: several temperatures or structures without ``--walkers``.
    """
    temperatures, structures = values.get("temperature_K"), values.get("structure")
    temperatures = temperatures if isinstance(temperatures, tuple) else ()
    structures = tuple(structures or ())
    if values.get("walkers") is None and (temperatures or len(structures) > 1):
        what = "temperatures" if temperatures else "structures"
        raise ValueError(f"several {what} need --walkers N (one run has one temperature and one start structure)")
    if temperatures:
        values["temperature_K"] = temperatures[0]
    values["structure"] = structures[0] if structures else None
    return temperatures, structures


def walkers_config_from_args(args: argparse.Namespace):
    """The :class:`~blip_ase.md.walkers.WalkersConfig` of ``blip md --walkers N``."""
    from blip_ase.md.walkers import WalkersConfig

    temperatures, structures = _walker_settings(dict(vars(args)))
    return WalkersConfig(
        md=config_from_args(args), n_walkers=args.walkers, temperatures_K=temperatures, structures=structures,
        respawn=args.respawn,
    )  # fmt: skip


def _given_fields(options: set[str] | None) -> set[str] | None:
    """The :class:`MDConfig` fields set on the command line (None when unknown)."""
    return None if options is None else {_FIELD_OF_OPTION.get(name, name) for name in options}


def _interrupt(signum, frame):
    from blip_ase import interrupts
    from blip_ase.md.lifecycle import Interrupted

    interrupts.handler(Interrupted)(signum, frame)


def run(args: argparse.Namespace) -> int:
    """Run MD; Ctrl-C and SIGTERM end it cleanly (summary and plot are still written).

    Returns:
        The exit code of ``EXIT_CODES`` (a bad input raises before anything is created: 2).
    """
    import signal
    import threading

    from blip_ase import interrupts
    from blip_ase.md import run_md
    from blip_ase.md.lifecycle import MDRunFailed

    if args.respawn and args.walkers is None:
        raise ValueError("--respawn needs --walkers N")
    if args.walkers is not None:
        return _run_walkers(args)
    config = config_from_args(args)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers need it
    signals = (signal.SIGTERM, signal.SIGINT) if in_main_thread else ()
    handlers = {sig: signal.signal(sig, _interrupt) for sig in signals}
    try:
        summary = run_md(config, given=_given_fields(getattr(args, "given_options", None)))
    except MDRunFailed as exc:
        print(f"blip md: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:  # a signal before the first step: nothing ran
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"blip md: interrupted by {signal.Signals(signum).name} before the run started", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        interrupts.clear()
    _print_summary(summary, config.out)
    if summary["status"] == "interrupted":
        return 128 + int(signal.Signals[summary["signal"]])
    return EXIT_OK


def _run_walkers(args: argparse.Namespace) -> int:
    """``blip md --walkers N``: the batched run, with the same signal handling and exit codes."""
    import signal
    import threading

    from blip_ase import interrupts
    from blip_ase.md.lifecycle import MDRunFailed
    from blip_ase.md.walkers import run_walkers

    config = walkers_config_from_args(args)
    in_main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT) if in_main_thread else ()
    handlers = {sig: signal.signal(sig, _interrupt) for sig in signals}
    try:
        summary = run_walkers(config)
    except MDRunFailed as exc:
        print(f"blip md: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        interrupts.clear()
    t = summary["timings"]
    counts = [f"{summary['n_completed']} completed", f"{summary['n_halted']} halted"]
    counts += [f"{summary[f'n_{k}']} {k}" for k in ("interrupted", "running") if summary[f"n_{k}"]]
    print(
        f"{summary['status']}: {summary['n_walkers']} walkers to step {summary['final_step']} "
        f"({t['walker_steps_per_second']:.0f} walker-steps/s): {', '.join(counts)}; "
        f"{summary['n_checked']} checks, {summary['n_flagged']} flagged"
    )
    for w in summary["walkers"]:
        if w["stop_reason"]:
            print(f"walker {w['walker']} ({w['temperature_K']:g} K): {w['status']} at {w['stop_reason']}")
    print(f"outputs in {config.md.out}/: flagged.extxyz flagged.h5 summary.json uncertainty.csv walker_<k>.traj")
    if summary["status"] == "interrupted":
        return 128 + int(signal.Signals[summary["signal"]])
    return EXIT_OK


def _print_summary(summary: dict, out: str) -> None:
    timings = summary["timings"]
    ms = timings["ms_per_step"]
    top = summary["max_force_std_max"]
    screened = summary.get("n_screened") or 0
    measured = f"max force std {top:.3f} eV/A" if top is not None else "no force std measured"
    print(
        f"{summary['status']}: {summary['steps_done']} steps to step {summary['final_step']} "
        f"({'%.2f ms/step' % ms if ms else 'no steps'}), {summary['n_checked']} checked "
        f"({screened} cleared by the screen without samples), {summary['n_flagged']} flagged, {measured}"
    )
    if summary["stop_reason"]:
        print(f"stopped ({summary.get('stop_check') or summary['status']}) at {summary['stop_reason']}")
    print(f"outputs in {out}/: flagged.extxyz flagged.h5 summary.json uncertainty.csv md.traj md.log")
