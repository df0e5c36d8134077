"""The variance-reduced noise of md_scripts/bench_estimators.py: unbiased on a closed form."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_estimators")


@pytest.mark.parametrize("estimator", ["independent", "antithetic", "orthogonal", "sobol"])
@pytest.mark.parametrize("n_samples", [4, 8])
def test_each_estimator_is_unbiased_for_a_quantity_linear_in_the_noise(bench, estimator, n_samples):
    """y = a . eps + b has variance |a|^2: the mean of the estimator's variance over many checks
    must match it (standard error about 1.3 % with 2000 checks of S >= 4), and every noise vector
    is standard normal (mean 0, variance 1 per dimension)."""
    rng = np.random.default_rng(0)
    dim = 50
    a, b = rng.normal(size=dim), 3.0
    estimates, draws = [], []
    for seed in range(2000):
        eps = bench.normals(estimator, n_samples, dim, seed).numpy()
        estimates.append(bench.variance(eps @ a + b, estimator))
        draws.append(eps)
    draws = np.concatenate(draws)
    assert np.mean(estimates) == pytest.approx(a @ a, rel=0.05)
    assert np.abs(draws.mean(axis=0)).max() < 0.1 and np.abs(draws.var(axis=0) - 1).max() < 0.15


def test_the_estimators_refuse_what_they_cannot_draw(bench):
    with pytest.raises(ValueError, match="even number"):
        bench.normals("antithetic", 5, 10, 0)
    with pytest.raises(ValueError, match="at most 21201"):
        bench.normals("sobol", 4, 30000, 0)
    with pytest.raises(ValueError, match="unknown estimator"):
        bench.normals("stratified", 4, 10, 0)


def test_a_biased_estimator_would_fail_the_check(bench):
    """The closed-form check can fail: ddof=1 on antithetic pairs overestimates by S / (S - 1)."""
    a = np.ones(20)
    wrong = [(bench.normals("antithetic", 4, 20, s).numpy() @ a).var(ddof=1) for s in range(2000)]
    assert np.mean(wrong) == pytest.approx(a @ a * 4 / 3, rel=0.05)
    assert np.mean(wrong) != pytest.approx(a @ a, rel=0.05)
