"""The cheap uncertainty screen: fitted from alpha/beta by blip calibrate, stored, reloaded, conservative."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from blip_ase import BLIPCalculator
from blip_ase.assets import ammonia_model
from blip_ase.inference.screen import Screen, fit_screen, rattled_copies
from blip_ase.models.checkpoint import read_checkpoint


def test_the_shipped_model_carries_a_screen_that_bounds_its_fitting_set(tmp_path):
    """``safety`` is the largest MC std / estimate on the fitting set, so on that set the bound is
    never below the Monte Carlo std it was fitted to (up to the noise of a different draw)."""
    ckpt = read_checkpoint(ammonia_model())
    screen = Screen.from_dict(ckpt["screen"])
    assert screen.safety >= 1.0 and screen.n_structures == 6 * 17 and np.isfinite(screen.rms_log_error)
    calc = BLIPCalculator.from_checkpoint(ammonia_model(), n_samples=100, seed=0, device="cpu")
    assert calc.engine.screen == screen
    frames = rattled_copies(_val()[:3], seed=5)
    ratios = []
    for atoms in frames:
        prepared = calc.engine.prepare(atoms)
        bound = calc.engine.screen_bound(prepared)[0]
        std = np.sqrt(calc.engine.monte_carlo(prepared, 100)[0]["forces_variance"])
        assert bound.shape == std.shape == (len(atoms),)
        ratios.append((std / bound).max())
    assert max(ratios) < 1.3  # another draw and other rattles: close to, not always under, 1


def _val():
    return read(Path(__file__).resolve().parents[1] / "examples" / "ammonia" / "val.extxyz", ":")


def test_fit_screen_recovers_a_log_linear_law_and_its_safety_is_the_worst_ratio():
    rng = np.random.default_rng(0)
    x = [np.c_[np.ones(20), rng.normal(size=(20, 2))] for _ in range(5)]
    true = np.array([-2.0, 0.5, -0.3])
    noise = [rng.normal(scale=0.1, size=20) for _ in range(5)]
    y = [np.exp(f @ true + e) for f, e in zip(x, noise)]
    screen = fit_screen(x, y, n_elements=0)
    np.testing.assert_allclose(screen.weights, true, atol=0.05)
    ratios = np.concatenate([yy / screen.estimate(f) for f, yy in zip(x, y)])
    assert screen.safety == pytest.approx(ratios.max())
    assert Screen.from_dict(screen.to_dict()) == screen


def test_a_screen_that_does_not_fit_the_model_or_is_malformed_is_refused():
    with pytest.raises(ValueError, match="malformed uncertainty screen"):
        Screen.from_dict({"weights": [1.0], "safety": float("nan"), "n_elements": 2})
    with pytest.raises(ValueError, match="malformed uncertainty screen"):
        Screen.from_dict({"safety": 1.0})
    screen = Screen((0.0, 1.0), 2.0, 1)
    with pytest.raises(ValueError, match="2 weights but the features have 3 columns"):
        screen.estimate(np.ones((4, 3)))
    shipped = BLIPCalculator.from_checkpoint(ammonia_model(), device="cpu")
    with pytest.raises(ValueError, match="2 weights but this model's screen inputs have 23 columns: .*blip calibrate"):
        shipped.engine.screen = screen  # refused when the checkpoint is loaded, not at the first check
    model = BLIPCalculator.from_checkpoint(ammonia_model(), device="cpu", calibration={})
    model.engine.screen = None
    with pytest.raises(ValueError, match="no uncertainty screen"):
        model.engine.screen_bound(model.engine.prepare(_val()[0]))


@pytest.mark.parametrize(("temperature_K", "seed"), [(300, 0), (1200, 1)])
def test_the_screen_never_clears_a_check_the_samples_would_flag_or_halt(tmp_path, temperature_K, seed):
    """The same seeded run with and without the screen follows the same trajectory (MAP forces move
    the atoms; the samples draw from the calculator's own generator): every check the screen
    cleared must be one whose Monte Carlo std (from the run without it) is below the flag, and the
    runs must end alike. At 300 K most checks are cleared, which is the point of the screen."""
    from blip_ase.md import MDConfig, Thresholds, run_md
    from blip_ase.md.writers import read_history

    base = dict(steps=300, temperature_K=temperature_K, seed=seed, n_samples=16, plot=False, uq_max_interval=10,
                thresholds=Thresholds(force_std_flag=0.25, force_std_halt=1.0))  # fmt: skip
    reference = run_md(MDConfig(out=str(tmp_path / "ref"), screen=False, **base))
    screened = run_md(MDConfig(out=str(tmp_path / "scr"), **base))
    ref = {r["step"]: r for r in read_history(tmp_path / "ref" / "uncertainty.csv")}
    rows = read_history(tmp_path / "scr" / "uncertainty.csv")
    cleared = [r for r in rows if np.isfinite(r["screen_bound"])]
    assert screened["n_screened"] == len(cleared) and [r["step"] for r in rows] == sorted(ref)
    for row in cleared:
        assert ref[row["step"]]["max_force_std"] < 0.25  # what the samples would have said: not flagged
        assert row["level"] == 0 and np.isnan(row["max_force_std"]) and row["screen_bound"] < 0.25
    # checks with samples draw other noise than the reference's (the cleared ones drew none), so
    # only clear flags must agree: every reference flag 20 % above the threshold is flagged
    clear_flags = {s for s, r in ref.items() if r["max_force_std"] > 1.2 * 0.25}
    assert clear_flags <= {r["step"] for r in rows if r["level"] >= 1}
    assert screened["status"] == reference["status"] and screened["halt_step"] == reference["halt_step"]
    if temperature_K == 300:
        assert len(cleared) > 0.5 * len(rows)


def test_an_anchored_screen_clears_only_within_its_steps_and_scales_with_the_bound():
    """After a check with samples (std 0.05 where the bound said 0.5) the screen's estimate is
    1.5 x 0.05 x bound / 0.5 for ``anchor_steps`` steps: a bound of 0.6 then means 0.09 < 0.25;
    a bound that grew 4x means 0.3, checked with samples; past the steps the bound alone counts."""
    from ase.build import molecule

    from blip_ase.md.policy import Thresholds
    from blip_ase.md.tracker import Tracker

    atoms = molecule("NH3")
    n = len(atoms)
    stats = {"energy": 0.0, "forces": np.zeros((n, 3)), "energy_variance": 1e-6, "forces_variance": np.full(n, 0.05**2)}
    where = {"energy_eV": 0.0, "time_fs": 0.0, "temperature_K": 300.0}
    for anchor_steps, cleared in ((50, [True, False, False]), (0, [False, False, False])):
        tracker = Tracker(Thresholds(force_std_flag=0.25, force_std_halt=1.0), anchor_steps=anchor_steps)
        assert tracker.screen(atoms, bound=np.full(n, 0.5), step=0, **where) == []  # above the flag: samples
        tracker.check(atoms, stats, step=0, time_fs=0.0, temperature_K=300.0)
        verdicts = [
            tracker.screen(atoms, bound=np.full(n, 0.6), step=10, **where),
            tracker.screen(atoms, bound=np.full(n, 2.0), step=20, **where),
            tracker.screen(atoms, bound=np.full(n, 0.6), step=100, **where),
        ]
        assert [not isinstance(v, list) for v in verdicts] == cleared
    assert tracker.n_screened == 0 and tracker.n_checked == 1


def test_the_plot_shows_screened_checks_and_one_threshold_line_per_element(tmp_path):
    from blip_ase.md.writers import plot_history

    nan = float("nan")
    history = [
        {"step": 0, "time_fs": 0.0, "temperature_K": 300.0, "max_force_std": 0.1, "level": 0, "screen_bound": nan},
        {"step": 10, "time_fs": 5.0, "temperature_K": 310.0, "max_force_std": nan, "level": 0, "screen_bound": 0.2},
        {"step": 20, "time_fs": 10.0, "temperature_K": 320.0, "max_force_std": 0.3, "level": 1, "screen_bound": nan},
    ]
    per_element = {"H": (0.25, 1.0), "N": (0.31, None)}
    fig = plot_history(tmp_path / "u.png", history, flag=0.3, halt=1.2, per_element=per_element)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "screened, bound (no samples; 1)" in labels and "flagged (1)" in labels
    assert [label for label in labels if label.startswith(("flag ", "halt "))] == [
        "flag H = 0.25 eV/A", "halt H = 1 eV/A", "flag N = 0.31 eV/A"
    ]
    assert (tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"


def test_a_power_law_calibration_maps_the_screen_bound_as_it_maps_the_variances():
    """The map is monotone, so a bound on the raw std stays a bound on the calibrated std: where
    the raw Monte Carlo std is under the raw bound, the calibrated std is under the calibrated bound."""
    calc = BLIPCalculator.from_checkpoint(ammonia_model(), n_samples=32, seed=0, device="cpu", calibration={})
    engine, atoms = calc.engine, rattled_copies(_val()[:1], seed=3)[0]
    prepared = engine.prepare(atoms)
    raw_bound = engine.screen_bound(prepared)[0]
    raw_std = np.sqrt(engine.monte_carlo(prepared, 32, generators=[_gen()])[0]["forces_variance"])
    power = {"gamma": 1.7, "reference": float(np.median(raw_std**2))}
    engine.calibration = {"forces": 0.6, "forces_power": power}
    bound = engine.screen_bound(prepared)[0]
    std = np.sqrt(engine.monte_carlo(prepared, 32, generators=[_gen()])[0]["forces_variance"])
    ref = power["reference"]
    np.testing.assert_allclose(bound, np.sqrt(0.6 * ref * (raw_bound**2 / ref) ** 1.7), rtol=1e-10)
    np.testing.assert_allclose(std, np.sqrt(0.6 * ref * (raw_std**2 / ref) ** 1.7), rtol=1e-10)
    under = raw_std <= raw_bound
    assert under.any() and np.all(std[under] <= bound[under])


def _gen():
    import torch

    return torch.Generator().manual_seed(11)
