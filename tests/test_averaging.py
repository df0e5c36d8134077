"""Weight averaging during training (``optim.ema_decay``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip_ase.training import load_config, with_overrides
from blip_ase.training.averaging import WeightAverage

AMMONIA = Path(__file__).resolve().parents[1] / "examples" / "ammonia"


def test_the_average_is_the_exponential_moving_average_and_swapping_restores_the_weights():
    model = torch.nn.Linear(3, 2)
    first = [p.detach().clone() for p in model.parameters()]
    ema = WeightAverage(model, 0.75)
    history = [first]
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(k + 1))
        ema.update(model)
        history.append([p.detach().clone() for p in model.parameters()])
    own = [p.detach().clone() for p in model.parameters()]
    for idx, avg in enumerate(ema.average):
        expected = history[0][idx]
        for step in history[1:]:
            expected = 0.75 * expected + 0.25 * step[idx]
        torch.testing.assert_close(avg, expected)
    with ema.swapped(model):
        for p, avg in zip(model.parameters(), ema.average):
            assert torch.equal(p, avg)
    for p, mine in zip(model.parameters(), own):
        assert torch.equal(p, mine)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1])
def test_a_bad_ema_decay_is_rejected(bad):
    cfg = load_config(AMMONIA / "config.yaml")
    with pytest.raises(ValueError, match="ema_decay"):
        with_overrides(cfg, {"optim": {"ema_decay": bad}})
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(torch.nn.Linear(1, 1), float(bad))


def test_training_with_an_average_saves_the_averaged_weights(tmp_path):
    """With a decay close to 1 the saved weights stay near the initial ones: the checkpoint holds
    the average, not the last weights."""
    from ase.io import read, write

    from blip_ase.models.checkpoint import load_checkpoint
    from blip_ase.training import train

    frames = read(AMMONIA / "train.extxyz", ":24")
    write(tmp_path / "train.extxyz", frames[:16])
    write(tmp_path / "val.extxyz", frames[16:])
    small = {"painn": {"n_features": 8, "n_interactions": 1}, "bayes": {"hidden": 8}, "epochs": 5, "batch_size": 8}
    base = with_overrides(load_config(AMMONIA / "config.yaml", progress=False), small)
    moved = {}
    for name, decay in (("plain", None), ("ema", 0.999)):
        cfg = with_overrides(base, {"optim": {"ema_decay": decay}, "seed": 3})
        train(cfg, tmp_path / "train.extxyz", tmp_path / "val.extxyz", tmp_path / name)
        model, _ = load_checkpoint(tmp_path / name / "model.pt")
        init = with_overrides(cfg, {"epochs": 1, "optim": {"lr": 1e-12, "posterior_lr": 1e-12, "ema_decay": None}})
        train(init, tmp_path / "train.extxyz", tmp_path / "val.extxyz", tmp_path / f"{name}_init")
        start, _ = load_checkpoint(tmp_path / f"{name}_init" / "model.pt")
        moved[name] = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), start.parameters()))
    assert moved["ema"] < 0.05 * moved["plain"], moved
