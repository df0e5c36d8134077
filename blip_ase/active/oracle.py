"""Oracles that label selected frames: PySCF, any ASE calculator, or files labelled elsewhere.

:func:`check_oracle` runs before any work: the calculator class imports and builds, PySCF is
installed and accepts the method and basis for every start structure. :func:`label_frames` runs
the oracle on an executor and hands every result to a callback as soon as it arrives, so the
caller writes it to disk at once:

- ``processes`` (default): local worker processes (``spawn``, one thread each) that die with the
  process that started them, whatever kills it (Linux: ``PR_SET_PDEATHSIG``; elsewhere a
  watchdog thread polling the parent), so a killed ``blip learn`` leaves no worker behind;
- ``dask``: a Dask ``distributed`` cluster (a scheduler address, or a ``LocalCluster``).

An ASE calculator is built once per worker process and reused for every frame. A calculation
that raises, an SCF that does not converge, a label that is not finite, or a lost Dask worker is
a :class:`Label` with ``error`` set: the caller records it and goes on.

This module imports neither torch nor the model: workers start fast.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms, units

if TYPE_CHECKING:
    from blip_ase.active.config import OracleConfig

PYSCF_MISSING = 'the pyscf oracle needs PySCF: pip install "blip-ase[dft]" (or pip install pyscf)'
DASK_MISSING = 'oracle.executor dask needs Dask: pip install "blip-ase[cluster]" (or pip install distributed)'
DELAY_ENV = "BLIP_LEARN_LABEL_DELAY_S"  # test hook: seconds each oracle call sleeps first (kill tests)


@dataclass
class Label:
    """One oracle result: ``energy`` (eV) and ``forces`` (n, 3) eV/A, or ``error`` (a failure);
    ``seconds``, ``pid`` and ``host`` of the call."""

    energy: float | None = None
    forces: np.ndarray | None = None
    error: str | None = None
    seconds: float = 0.0
    pid: int = 0
    host: str = ""


def ase_calculator(config: OracleConfig):
    """A fresh instance of ``config.calculator`` (``module:Class``) with ``config.kwargs``.

    Raises:
        ValueError: the module or class cannot be imported, or the class rejects the arguments.
    """
    module_name, _, class_name = str(config.calculator).partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"oracle calculator {config.calculator!r} cannot be imported: {exc}") from None
    try:
        return cls(**config.kwargs)
    except Exception as exc:  # any constructor error means the configuration is wrong
        raise ValueError(f"oracle calculator {config.calculator!r} rejects kwargs {config.kwargs}: {exc}") from None


_CALCULATORS: dict[str, object] = {}  # per process: one calculator per oracle configuration


def cached_calculator(config: OracleConfig):
    """The calculator of ``config`` built once in this process (a worker reuses it frame after frame)."""
    key = json.dumps([config.calculator, config.kwargs], sort_keys=True, default=repr)
    if key not in _CALCULATORS:
        _CALCULATORS[key] = ase_calculator(config)
    return _CALCULATORS[key]


def _pyscf_mol(atoms: Atoms, config: OracleConfig):
    from pyscf import gto

    return gto.M(
        atom=list(zip(atoms.get_chemical_symbols(), atoms.positions.tolist())), basis=config.basis,
        charge=config.charge, spin=config.spin, unit="Angstrom", verbose=0,
    )  # fmt: skip


def _pyscf_method(mol, config: OracleConfig):
    from pyscf import dft, scf

    if config.method.lower() == "hf":
        mf = scf.RHF(mol) if config.spin == 0 else scf.UHF(mol)
    else:
        mf = dft.RKS(mol) if config.spin == 0 else dft.UKS(mol)
        mf.xc = config.method
    mf.max_cycle = config.max_cycle
    return mf


def check_oracle(config: OracleConfig, structures: Sequence[Atoms]) -> None:
    """Raise ``ValueError`` when the oracle cannot label ``structures`` (nothing is computed).

    ``pyscf``: installed, molecular structures only, the basis exists for every element and is
    consistent with charge and spin, the method is HF or a functional libxc knows.
    ``ase``: the class imports and accepts ``kwargs``. ``external``: nothing to check.
    """
    if config.executor == "dask" and config.kind != "external":
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ValueError(DASK_MISSING) from None
    if config.kind == "ase":
        ase_calculator(config)
    if config.kind != "pyscf":
        return
    try:
        from pyscf.dft import libxc
    except ImportError:
        raise ValueError(PYSCF_MISSING) from None
    if config.method.lower() != "hf":
        try:
            libxc.parse_xc(config.method)
        except Exception as exc:  # KeyError for an unknown functional name
            raise ValueError(
                f"PySCF does not know the method {config.method!r} ({exc}); use 'hf' or a functional"
            ) from None
    for atoms in structures:
        if atoms.pbc.any():
            raise ValueError(f"the pyscf oracle labels molecules; {atoms.get_chemical_formula()} is periodic")
        try:
            _pyscf_method(_pyscf_mol(atoms, config), config)
        except Exception as exc:  # unknown basis, inconsistent spin: pyscf raises several types
            raise ValueError(
                f"PySCF rejects basis {config.basis!r} / charge {config.charge} / spin {config.spin} for "
                f"{atoms.get_chemical_formula()}: {type(exc).__name__}: {exc}"
            ) from None


def _label_pyscf(atoms: Atoms, config: OracleConfig) -> tuple[float, np.ndarray]:
    from pyscf import lib

    with lib.with_omp_threads(1):
        mf = _pyscf_method(_pyscf_mol(atoms, config), config)
        energy = mf.kernel()
        if not mf.converged:
            raise RuntimeError(f"SCF did not converge in {config.max_cycle} cycles")
        gradient = mf.nuc_grad_method().kernel()
    return float(energy) * units.Hartree, -np.asarray(gradient) * units.Hartree / units.Bohr


def label_one(atoms: Atoms, config: OracleConfig, *, delay_s: float = 0.0) -> Label:
    """Label one frame (never raises: a failure is a :class:`Label` with ``error``)."""
    start = time.perf_counter()
    if delay_s:
        time.sleep(delay_s)
    where = {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        bare = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        if config.kind == "pyscf":
            energy, forces = _label_pyscf(bare, config)
        else:
            calc = cached_calculator(config)
            calc.reset()  # no results of the previous frame survive
            bare.calc = calc
            energy, forces = float(bare.get_potential_energy()), np.array(bare.get_forces(), float)
            bare.calc = None
    except Exception as exc:  # any oracle error is a recorded failure, not a crash of the loop
        return Label(error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start, **where)
    label = Label(energy=energy, forces=forces, seconds=time.perf_counter() - start, **where)
    return checked(label, len(atoms))


def checked(label: Label, n_atoms: int) -> Label:
    """``label``, or a failure when its energy or forces are missing, misshapen or not finite."""
    if label.error is not None:
        return label
    forces = None if label.forces is None else np.asarray(label.forces, float)
    if label.energy is None or not np.isfinite(label.energy):
        label.error = f"non-finite or missing energy {label.energy!r}"
    elif forces is None or forces.shape != (n_atoms, 3) or not np.isfinite(forces).all():
        label.error = "non-finite, missing or misshapen forces"
    return label


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid`` ends, however it ends (SIGKILL included).

    Linux: the kernel sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``); a parent
    that died before the call is caught by comparing ``os.getppid()``. Elsewhere: a daemon thread
    polls ``os.getppid()`` every 0.5 s.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl failed")
    except (OSError, AttributeError):  # not Linux: poll instead
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_init(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends the workers
    for name in THREAD_VARIABLES:
        os.environ[name] = "1"


def _label_indexed(item: tuple[int, Atoms, OracleConfig, float]) -> tuple[int, Label]:
    k, atoms, config, delay = item
    return k, label_one(atoms, config, delay_s=delay)


def default_workers() -> int:
    """The machine's cores available to this process."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def label_frames(
    frames: Sequence[Atoms], config: OracleConfig, on_label: Callable[[int, Label], None], *, workers: int | None = None
) -> None:
    """Label ``frames`` on ``config.executor`` with ``workers`` processes (None: ``config.workers``
    or the cores; 1 with the ``processes`` executor: in this process) and call
    ``on_label(index, label)`` in this process as each result arrives."""
    workers = workers or config.workers or default_workers()
    delay = float(os.environ.get(DELAY_ENV, 0) or 0)
    if not frames:
        return
    if config.executor == "dask":
        return _label_on_dask(frames, config, on_label, workers, delay)
    if workers == 1 or len(frames) == 1:
        for k, atoms in enumerate(frames):
            on_label(k, label_one(atoms, config, delay_s=delay))
        return
    import multiprocessing

    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update({k: "1" for k in THREAD_VARIABLES})  # spawned children read them at their first numpy import
    try:
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(min(workers, len(frames)), initializer=_worker_init, initargs=(os.getpid(),))
        try:
            items = [(k, atoms, config, delay) for k, atoms in enumerate(frames)]
            for k, label in pool.imap_unordered(_label_indexed, items):
                on_label(k, label)
            pool.close()
        finally:
            pool.terminate()  # also on Ctrl-C or an error: no worker outlives the labelling
            pool.join()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _label_on_dask(
    frames: Sequence[Atoms], config: OracleConfig, on_label: Callable[[int, Label], None], workers: int, delay: float
) -> None:
    """Label on a Dask cluster: ``config.dask_address``, or a ``LocalCluster`` of ``workers``
    single-threaded processes that lives for this call. A task lost with its worker is a failure."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ValueError(DASK_MISSING) from None
    cluster = None
    if config.dask_address is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               env={k: "1" for k in THREAD_VARIABLES})  # fmt: skip
    client = Client(config.dask_address or cluster)
    try:
        futures = {client.submit(label_one, atoms, config, delay_s=delay, pure=False): k
                   for k, atoms in enumerate(frames)}  # fmt: skip
        for future in as_completed(futures):
            try:
                label = future.result()
            except Exception as exc:  # a worker lost, a scheduler error: recorded, the loop goes on
                label = Label(error=f"dask: {type(exc).__name__}: {exc}")
            on_label(futures[future], label)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
