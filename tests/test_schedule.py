"""The adaptive check interval (blip_ase.md.schedule) alone and in run_md and the walkers."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule
from ase.io import write

from blip_ase.assets import ammonia_model
from blip_ase.md import DEFAULT_THRESHOLDS, MDConfig, Thresholds, read_history, run_md
from blip_ase.md.schedule import CheckSchedule


def checks(schedule: CheckSchedule, ratios, steps: int, resets=()) -> list[int]:
    """Steps checked in ``steps`` steps; the k-th check reports ``ratios[k % len]``; a respawn
    (reset) at each step of ``resets``."""
    done = []
    for step in range(steps):
        if step in resets:
            schedule.reset(step)
        if schedule.due(step):
            schedule.checked(step, ratios[len(done) % len(ratios)])
            done.append(step)
    return done


def test_a_fixed_schedule_checks_every_interval():
    assert checks(CheckSchedule(10), [0.0], 60) == [0, 10, 20, 30, 40, 50]
    assert checks(CheckSchedule(10, 10), [0.0], 60) == [0, 10, 20, 30, 40, 50]


def test_quiet_checks_double_the_gap_up_to_the_maximum_and_any_other_check_resets_it():
    assert checks(CheckSchedule(10, 40), [0.1], 200) == [0, 20, 60, 100, 140, 180]
    # a check at half the limit or above (or unknown) is not quiet
    assert checks(CheckSchedule(10, 40), [0.1, 0.1, 0.6], 100) == [0, 20, 60, 70, 90]
    assert checks(CheckSchedule(10, 40), [float("nan")], 40) == [0, 10, 20, 30]
    assert checks(CheckSchedule(10, 40), [float("inf")], 40) == [0, 10, 20, 30]


@pytest.mark.parametrize("interval,max_interval", [(1, 1), (1, 7), (5, 20), (10, 35), (3, 64)])
def test_no_gap_exceeds_the_maximum_and_checks_return_to_the_grid(interval, max_interval):
    rng = np.random.default_rng(interval * 100 + max_interval)
    ratios = rng.choice([0.0, 0.2, 0.49, 0.5, 0.9, 2.0, np.nan], size=97).tolist()
    resets = set(rng.integers(0, 3000, size=25).tolist())  # respawns, mostly off the grid
    done = checks(CheckSchedule(interval, max_interval), ratios, 3000, resets)
    gaps = np.diff(done)
    assert gaps.max() <= max_interval and gaps.min() >= 1
    if max_interval >= 2 * interval:
        assert gaps.max() > interval  # it did adapt
    after_reset = [s for a, s in zip(done, done[1:]) if a in resets and not resets & set(range(a + 1, s + 1))]
    assert all(s % interval == 0 for s in after_reset)  # back on the grid right after a respawn


def test_bad_intervals_are_refused_with_their_names():
    with pytest.raises(ValueError, match="uq_max_interval"):
        CheckSchedule(10, 5)
    with pytest.raises(ValueError, match="uq_interval"):
        CheckSchedule(0)
    with pytest.raises(ValueError, match="uq_max_interval"):
        MDConfig(uq_interval=10, uq_max_interval=5)


def test_run_md_checks_less_often_far_from_the_thresholds_and_every_interval_near_them(tmp_path):
    common = dict(model=str(ammonia_model()), steps=200, uq_interval=5, uq_max_interval=20, n_samples=4, plot=False)
    run_md(MDConfig(**common, out=str(tmp_path / "quiet"), thresholds=DEFAULT_THRESHOLDS, screen=False))
    steps = [r["step"] for r in read_history(tmp_path / "quiet" / "uncertainty.csv")]
    gaps = np.diff(steps)
    assert gaps.max() == 20 and gaps.min() >= 5 and len(steps) < 200 // 5  # 300 K: far below the flag
    # every check is flagged at threshold 0: never quiet, so every interval
    loud = MDConfig(**common, out=str(tmp_path / "loud"), thresholds=Thresholds(force_std_flag=0.0))
    run_md(loud)
    assert [r["step"] for r in read_history(tmp_path / "loud" / "uncertainty.csv")] == list(range(0, 205, 5))


def test_walkers_keep_their_own_adaptive_schedules(tmp_path):
    from blip_ase.md.walkers import WalkersConfig, run_walkers

    start = tmp_path / "nh3.extxyz"
    write(start, molecule("NH3"))
    md = MDConfig(model=str(ammonia_model()), structure=str(start), out=str(tmp_path / "w"), steps=100,
                  uq_interval=5, uq_max_interval=20, n_samples=4, plot=False, ensemble="nve",
                  thresholds=DEFAULT_THRESHOLDS, screen=False)  # fmt: skip
    run_walkers(WalkersConfig(md, n_walkers=2, temperatures_K=(300.0, 300.0)))
    rows = read_history(tmp_path / "w" / "uncertainty.csv")
    for k in (0, 1):
        steps = [r["step"] for r in rows if r["walker"] == k]
        gaps = np.diff(steps)
        assert steps[0] == 0 and gaps.max() <= 20 and gaps.max() > 5 and all(s % 5 == 0 for s in steps)


def test_the_screen_of_a_subset_of_due_walkers_sees_each_walkers_own_structure(tmp_path, monkeypatch):
    """Walkers whose schedules differ are due at different steps; the screen then builds the
    structures of the due ones only, and each walker's tracker must get its own walker's structure
    (walkers of different sizes make a mix-up visible)."""
    from blip_ase.md.tracker import Tracker
    from blip_ase.md.walkers import WalkersConfig, run_walkers

    seen: list[tuple[int, int, int]] = []  # (step, walker, atoms the tracker was given)
    screen = Tracker.screen

    def recording(self, atoms, **kwargs):
        seen.append((kwargs["step"], self.extra["walker"], len(atoms)))
        return screen(self, atoms, **kwargs)

    monkeypatch.setattr(Tracker, "screen", recording)
    starts = tmp_path / "starts.extxyz"
    write(starts, [molecule("NH3"), molecule("N2H4")])
    md = MDConfig(model=str(ammonia_model()), out=str(tmp_path / "w"), steps=200, uq_interval=5, uq_max_interval=20,
                  n_samples=4, plot=False, ensemble="nve",
                  thresholds=Thresholds(force_std_flag=1.0, force_std_halt=20.0))  # fmt: skip
    run_walkers(WalkersConfig(md, n_walkers=3, temperatures_K=(100.0, 1500.0, 100.0), structures=(str(starts),)))
    sizes = {0: 4, 1: 6, 2: 4}
    assert seen and all(n == sizes[walker] for _, walker, n in seen), seen
    per_step: dict[int, set] = {}
    for step, walker, _ in seen:
        per_step.setdefault(step, set()).add(walker)
    assert any(len(w) < 3 for w in per_step.values()) and any(len(w) > 1 for w in per_step.values())
