"""Cost of one training epoch with the shipped BLIP loss against the paper's loss.

    python md_scripts/bench_epoch.py [--data examples/acac/acac_train_300K.extxyz] [--frames 64]
        [--variant NAME=JSON ...]

Both models are built from the same example config; "paper" applies the paper's settings of
``md_scripts/compare_uq.py`` (no contrastive prior, element-only beta), "shipped" is the config
as shipped. Each round times one epoch of each (training steps only, validation excluded),
alternating; the best of ``--rounds`` is kept. Prints one JSON object with the seconds per epoch
(process CPU time, robust to other jobs) and the ratio shipped / paper; each ``--variant``
(config overrides on top of the shipped config, as in ``compare_uq.py``) is timed in the same
rounds and reported as its ratio to shipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_epoch(overrides: dict, config: Path, frames: list, batch_size: int):
    """A closure that runs one epoch of training steps on ``frames``."""
    import numpy as np
    import torch

    from blip_ase.training import load_config, with_overrides
    from blip_ase.training.loop import build_model, fit_normalisation, make_optimizer, train_step

    cfg = with_overrides(load_config(config, progress=False, batch_size=batch_size), overrides)
    elements = sorted({int(z) for a in frames for z in a.numbers})
    torch.manual_seed(0)
    model = build_model(cfg, elements)
    data = model.make_dataset(frames)
    fit_normalisation(model, data)
    optimizer = make_optimizer(model, cfg)
    gens = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    rng = np.random.default_rng(0)

    def epoch() -> None:
        model.train()
        for batch in data.batches(cfg.batch_size, shuffle=True, rng=rng):
            train_step(model, batch.to("cpu", torch.float32), cfg, optimizer, gens[0], False,
                       contrastive_generator=gens[1])

    return epoch


def main(argv: list[str] | None = None) -> int:
    import sys

    sys.path.insert(0, str(ROOT / "md_scripts"))
    import torch
    from ase.io import read

    from compare_uq import PAPER, parse_variants

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "examples" / "acac" / "acac_train_300K.extxyz"))
    parser.add_argument("--config", default=str(ROOT / "examples" / "acac" / "config.yaml"))
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="config overrides timed against the shipped config (repeatable)")
    args = parser.parse_args(argv)
    variants = parse_variants(args.variant)  # a bad NAME=JSON is refused before any work
    torch.set_num_threads(1)
    frames = read(args.data, f":{args.frames}")
    epochs = {"paper": make_epoch(PAPER, Path(args.config), frames, args.batch_size),
              "shipped": make_epoch({}, Path(args.config), frames, args.batch_size),
              **{name: make_epoch(o, Path(args.config), frames, args.batch_size) for name, o in variants.items()}}
    best = {name: float("inf") for name in epochs}
    for _ in range(args.rounds):
        for name, epoch in epochs.items():
            start = time.process_time()
            epoch()
            best[name] = min(best[name], time.process_time() - start)
    print(json.dumps({"seconds_per_epoch": best, "ratio": best["shipped"] / best["paper"],
                      **({"ratio_to_shipped": {n: best[n] / best["shipped"] for n in variants}} if variants else {}),
                      "frames": args.frames, "data": args.data}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
