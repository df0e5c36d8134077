"""``blip md``: uncertainty-monitored NVE/NVT/NPT molecular dynamics with flagged-frame export.

Thin over :func:`blip_ase.md.run_md`: parses options into an :class:`~blip_ase.md.MDConfig`.
"""

from __future__ import annotations

import argparse

HELP = "run uncertainty-monitored molecular dynamics (MAP forces, Monte Carlo uncertainty every k steps)"

EPILOG = """\
Outputs in --out: md.traj (ASE trajectory, restart point), md.log, flagged.extxyz and flagged.h5
(frames above the flag threshold, with blip_energy, blip_forces, blip_forces_variance,
blip_energy_variance, step, time, reason, flagged_atoms), uncertainty.csv and uncertainty.png
(history and plot), summary.json (counts, thresholds, stop reason, timings). A frame above a halt
threshold is exported and stops the run at that step (summary status "halted", exit code 0).
"""

# Defaults for the shipped ammonia model (examples/ammonia/model.pt): see README.md,
# section "Uncertainty-monitored molecular dynamics".
DEFAULT_FLAG = 0.45
DEFAULT_HALT = 1.0


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
    dev = parser.add_argument_group("compute")
    dev.add_argument("--device", default=None, help="torch device; None = CUDA if available, else CPU")
    dev.add_argument(
        "--torch-threads", type=int, default=1, help="CPU threads for torch (small molecules run fastest on one)"
    )


def _add_io(group) -> None:
    group.add_argument(
        "--model",
        default="examples/ammonia/model.pt",
        help="BLIP checkpoint (a relative path missing here is looked up in the blip-ase repository)",
    )
    group.add_argument(
        "--structure",
        default="examples/ammonia/nh3.xyz",
        help="starting structure, any ase.io format, first frame (looked up like --model)",
    )
    group.add_argument("--out", default="md_out", help="output directory")
    group.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    group.add_argument(
        "--restart",
        action="store_true",
        help="continue the run in --out from the last frame of md.traj up to --steps steps in total",
    )
    group.add_argument("--traj-interval", type=int, default=10, help="steps between trajectory and log frames")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--no-plot", action="store_true", help="do not write uncertainty.png")


def _add_dynamics(group) -> None:
    from blip_ase.md.dynamics import ENSEMBLES

    group.add_argument(
        "--ensemble",
        choices=ENSEMBLES,
        default="nvt-langevin",
        help="integrator: nve = VelocityVerlet, nvt-langevin, nvt-bussi, nvt-nose-hoover = NoseHooverChainNVT, "
        "npt-mtk-isotropic = IsotropicMTKNPT, npt-mtk = MTKNPT, npt-berendsen = NPTBerendsen",
    )
    group.add_argument("--steps", type=int, default=2000, help="total number of MD steps")
    group.add_argument("--timestep-fs", type=float, default=0.5, help="time step (fs)")
    group.add_argument("--temperature-K", type=float, default=300.0, help="thermostat temperature (K)")
    group.add_argument(
        "--init-temperature-K",
        type=_optional_float,
        default=None,
        help="temperature of the initial Maxwell-Boltzmann velocities (K); None = --temperature-K",
    )
    group.add_argument("--pressure-bar", type=float, default=1.0, help="barostat pressure (bar), NPT only")
    group.add_argument("--friction-per-fs", type=float, default=0.01, help="Langevin friction (1/fs)")
    group.add_argument(
        "--tdamp-fs", type=float, default=50.0, help="thermostat time constant (fs): Bussi, Nose-Hoover, MTK, Berendsen"
    )
    group.add_argument("--pdamp-fs", type=float, default=500.0, help="barostat time constant (fs): MTK, Berendsen")
    group.add_argument(
        "--compressibility-per-bar", type=float, default=4.57e-5, help="NPTBerendsen compressibility (1/bar)"
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of the initial velocities, the Langevin/Bussi noise and the MC noise"
    )


def _add_monitor(group) -> None:
    group.add_argument("--n-samples", type=int, default=16, help="Monte Carlo samples per uncertainty check")
    group.add_argument("--uq-interval", type=int, default=10, help="steps between uncertainty checks")
    group.add_argument(
        "--flag-force-std-eV-per-A",
        type=_optional_float,
        default=DEFAULT_FLAG,
        help="export frames whose max per-atom force std is above this (eV/A)",
    )
    group.add_argument(
        "--halt-force-std-eV-per-A",
        type=_optional_float,
        default=DEFAULT_HALT,
        help="stop at the first checked frame whose max per-atom force std is above this (eV/A)",
    )
    group.add_argument(
        "--flag-relative", type=_optional_float, default=None, help="flag threshold on max_i std_i / (|F_i| + nu)"
    )
    group.add_argument(
        "--halt-relative", type=_optional_float, default=None, help="halt threshold on max_i std_i / (|F_i| + nu)"
    )
    group.add_argument("--relative-nu-eV-per-A", type=float, default=1.0, help="nu of the relative force std (eV/A)")
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


def config_from_args(args: argparse.Namespace):
    """The :class:`~blip_ase.md.MDConfig` described by parsed ``blip md`` options."""
    from blip_ase.md import MDConfig, Thresholds

    thresholds = Thresholds(
        force_std_flag=args.flag_force_std_eV_per_A,
        force_std_halt=args.halt_force_std_eV_per_A,
        relative_flag=args.flag_relative,
        relative_halt=args.halt_relative,
        relative_nu=args.relative_nu_eV_per_A,
        energy_std_flag=args.flag_energy_std_eV_per_atom,
        energy_std_halt=args.halt_energy_std_eV_per_atom,
        per_element=dict(args.element_threshold or []),
    )
    return MDConfig(
        model=args.model,
        structure=args.structure,
        out=args.out,
        ensemble=args.ensemble,
        steps=args.steps,
        timestep_fs=args.timestep_fs,
        temperature_K=args.temperature_K,
        pressure_bar=args.pressure_bar,
        friction_per_fs=args.friction_per_fs,
        tdamp_fs=args.tdamp_fs,
        pdamp_fs=args.pdamp_fs,
        compressibility_per_bar=args.compressibility_per_bar,
        init_temperature_K=args.init_temperature_K,
        seed=args.seed,
        n_samples=args.n_samples,
        uq_interval=args.uq_interval,
        traj_interval=args.traj_interval,
        thresholds=thresholds,
        device=args.device,
        overwrite=args.overwrite,
        restart=args.restart,
        progress=not args.no_progress,
        plot=not args.no_plot,
    )


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run MD; SIGTERM and Ctrl-C end it cleanly (summary and plot are still written)."""
    import signal
    import threading

    import torch

    from blip_ase.md import run_md

    if args.torch_threads < 1:
        raise ValueError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    config = config_from_args(args)
    torch.set_num_threads(args.torch_threads)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers need it
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        summary = run_md(config)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    timings = summary["timings"]
    ms = timings["ms_per_step"]
    print(
        f"{summary['status']}: {summary['steps_done']} steps to step {summary['final_step']} "
        f"({'%.2f ms/step' % ms if ms else 'no steps'}), {summary['n_checked']} checked, "
        f"{summary['n_flagged']} flagged, max force std {summary['max_force_std_max'] or 0:.3f} eV/A"
    )
    if summary["stop_reason"]:
        print(f"halted at {summary['stop_reason']}")
    print(f"outputs in {config.out}/: flagged.extxyz flagged.h5 summary.json uncertainty.csv md.traj md.log")
    return 0
