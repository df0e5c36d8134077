"""Fewer Monte Carlo samples for the same precision? Variance-reduced noise for the force std.

Each estimator draws the S noise vectors of one check differently; every noise vector is still
marginally standard normal, so a sample is a correct sample of the model:

- ``independent``: S independent draws (what the library does);
- ``antithetic``: S/2 independent draws and their negatives (pairs ``eps, -eps``);
- ``orthogonal``: S draws made mutually orthogonal (Gram-Schmidt of independent draws, each row
  rescaled to its original length, so each row is still N(0, I));
- ``sobol``: a scrambled Sobol sequence of S points in the noise dimension, mapped to normals by
  the inverse normal CDF (quasi-Monte Carlo; the noise of one check must fit Sobol's 21201
  dimensions).

For every structure the reference per-atom force std comes from ``--reference-samples``
(default 256) independent samples; each estimator is then repeated ``--repeats`` times with S in
``--samples`` and its relative error ``std_S / std_ref - 1`` is collected over atoms, structures
and repeats. Printed (and written as JSON): the RMS relative error, the mean relative error
(bias) and the RMS error relative to the independent estimator's at the same S.

The variance estimate of every estimator is the unbiased one for a quantity that is linear in the
noise (:func:`variance`): ddof=1 for independent and orthogonal draws, ddof=0 for antithetic pairs,
whose mean is exact for a linear quantity, and for Sobol points, whose mean is exact in each
dimension to the sequence's stratification (with ddof=1 they overestimate the variance by
S / (S - 1); tested on a closed form in ``tests/test_estimators.py``).

    OMP_NUM_THREADS=1 python md_scripts/bench_estimators.py --out bench_estimators.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ("independent", "antithetic", "orthogonal", "sobol")


def normals(estimator: str, n_samples: int, dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """``(n_samples, dim)`` standard normals drawn by ``estimator`` from ``seed``.

    Raises:
        ValueError: an unknown estimator, an odd S for antithetic pairs, or a Sobol dimension
            above 21201.
    """
    g = torch.Generator().manual_seed(int(seed))
    if estimator == "independent":
        return torch.randn(n_samples, dim, generator=g, dtype=dtype)
    if estimator == "antithetic":
        if n_samples % 2:
            raise ValueError(f"antithetic pairs need an even number of samples, got {n_samples}")
        half = torch.randn(n_samples // 2, dim, generator=g, dtype=dtype)
        return torch.cat([half, -half])
    if estimator == "orthogonal":
        draws = torch.randn(n_samples, dim, generator=g, dtype=dtype)
        if n_samples > dim:
            raise ValueError(f"{n_samples} orthogonal draws need dimension >= {n_samples}, got {dim}")
        q, r = torch.linalg.qr(draws.T)  # q (dim, S): orthonormal columns spanning the draws
        q = q * torch.sign(torch.diagonal(r))  # the Gram-Schmidt signs (Haar-distributed directions)
        return q.T * draws.norm(dim=1, keepdim=True)
    if estimator == "sobol":
        most = torch.quasirandom.SobolEngine.MAXDIM
        if dim > most:
            raise ValueError(f"Sobol sequences have at most {most} dimensions, got {dim}")
        engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=int(seed))
        u = engine.draw(n_samples, dtype=dtype).clamp(1e-12, 1 - 1e-12)
        return torch.special.ndtri(u)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def variance(samples: np.ndarray, estimator: str, axis: int = 0) -> np.ndarray:
    """The variance estimate of ``estimator`` along ``axis`` (unbiased for a linear quantity)."""
    return samples.var(axis=axis, ddof=0 if estimator in ("antithetic", "sobol") else 1)


class TapeNoise:
    """A :class:`~blip_ase.bayes.NoiseSource` whose tape is drawn by an estimator (single structure)."""

    def __new__(cls, estimator: str, n_samples: int, seed: int):
        from blip_ase.bayes import NoiseSource

        class _Source(NoiseSource):
            def _fill(self, per_sample, dtype):
                return normals(estimator, self.n_samples, per_sample, seed, dtype=torch.float64).to(dtype)

            def split(self, start, stop):  # the bench runs all samples in one pass
                raise NotImplementedError

        return _Source([torch.Generator() for _ in range(n_samples)])


def force_std(engine, prepared, estimator: str, n_samples: int, seed: int) -> np.ndarray:
    """``(n,)`` per-atom force std (eV/A, uncalibrated) of one structure from ``n_samples``."""
    engine.coefficients(prepared)
    raw = engine.model.predict(
        prepared.graph, coefficients=engine.coefficients(prepared), noise=TapeNoise(estimator, n_samples, seed),
        compute_stress=False,
    )["forces"].detach().double().numpy()  # fmt: skip
    return np.sqrt(variance(raw, estimator).sum(axis=-1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--reference-samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--structures", type=int, default=10, help="from each of the ID and OOD sets")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_estimators.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ase.io import read

    from blip_ase import BLIPCalculator
    from blip_ase.assets import ammonia_model

    started = time.perf_counter()
    calc = BLIPCalculator.from_checkpoint(ammonia_model(), device="cpu", dtype="float64")
    engine = calc.engine
    sets = {
        "ID (ammonia val)": read(ROOT / "examples" / "ammonia" / "val.extxyz", f":{args.structures}"),
        "OOD (ammonia ood)": read(ROOT / "examples" / "ammonia" / "ood.extxyz", f":{args.structures}"),
    }
    table = {}
    for name, frames in sets.items():
        errors = {(e, s): [] for e in args.estimators for s in args.samples}
        for k, atoms in enumerate(frames):
            prepared = engine.prepare(atoms)
            ref = force_std(engine, prepared, "independent", args.reference_samples, seed=10**6 + k)
            for e in args.estimators:
                for s in args.samples:
                    for r in range(args.repeats):
                        std = force_std(engine, prepared, e, s, seed=1000 * k + r)
                        errors[(e, s)].append(std / ref - 1.0)
        rows = {}
        for (e, s), values in errors.items():
            v = np.concatenate(values)
            rows[f"{e} S={s}"] = {"rms_relative_error": float(np.sqrt(np.mean(v**2))), "bias": float(np.mean(v))}
        for e in args.estimators:
            for s in args.samples:
                base = rows[f"independent S={s}"]["rms_relative_error"] if "independent" in args.estimators else np.nan
                rows[f"{e} S={s}"]["rms_over_independent"] = rows[f"{e} S={s}"]["rms_relative_error"] / base
        table[name] = rows
        print(name)
        for key, row in rows.items():
            print(f"  {key:16s} rms {row['rms_relative_error']:.3f}  bias {row['bias']:+.3f}  "
                  f"/ independent {row['rms_over_independent']:.2f}")  # fmt: skip
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "wall_seconds": time.perf_counter() - started,
        "sets": table,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
