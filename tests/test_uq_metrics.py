"""Uncertainty metrics and calibration on constructed cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from blip_ase import BLIPCalculator
from blip_ase.inference.calibration import (
    apply_isotonic,
    apply_power,
    calibrated_forces_variance,
    isotonic_variance_factor,
    structure_means,
    validate_power,
    variance_factors,
)
from blip_ase.uq import metrics as m
from blip_ase.uq.calibration import fit_isotonic, fit_power_law, fit_variance_scale, pool_adjacent_violators


def gaussian_forces(seed: int = 0, n_atoms: int = 5000, sigma_factor: float = 1.0):
    """Force errors drawn from the predicted distribution: per-atom trace variance ``v`` and
    errors ``N(0, v/3)`` per component. Returns ``(error (n, 3), v (n,))``; the predicted
    variance is ``sigma_factor^2 * v`` (1 = calibrated)."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.01, 1.0, n_atoms)
    error = rng.normal(size=(n_atoms, 3)) * np.sqrt(v / 3.0)[:, None]
    return error, sigma_factor**2 * v


def components(error: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return error.ravel(), np.repeat(v / 3.0, 3)


# --- ECE -------------------------------------------------------------------------------------


def test_errors_drawn_from_the_predicted_gaussian_give_an_ece_close_to_zero():
    """Measured for 15000 components: 0.0034 (seed 0); over 300 seeds mean 0.0025, max 0.0071."""
    error, v = gaussian_forces(seed=0)
    assert m.expected_calibration_error(*components(error, v)) < 0.01


def test_a_sigma_ten_times_too_small_gives_a_large_ece_equal_to_its_expected_value():
    """With z = 10 x, x ~ N(0, 1): p_obs(p) = Phi(Phi^-1(p) / 10); the ECE is its integral."""
    error, v = gaussian_forces(seed=1, sigma_factor=0.1)
    ece = m.expected_calibration_error(*components(error, v))
    p = m.ECE_GRID
    expected = integrate.trapezoid(np.abs(stats.norm.cdf(stats.norm.ppf(p) / 10.0) - p), p)
    assert ece > 0.2
    assert ece == pytest.approx(expected, abs=0.01)


def test_ece_is_bounded_by_one_half_and_the_grid_has_100_points_in_the_open_unit_interval():
    assert m.ECE_GRID.size == 100 and 0 < m.ECE_GRID.min() and m.ECE_GRID.max() < 1
    all_below = m.expected_calibration_error(np.full(50, -10.0), np.full(50, 1e-6))
    assert 0.45 < all_below < 0.5


def test_calibration_curve_counts_levels_at_or_below_p():
    error = np.array([-1.0, 0.0, 1.0, 2.0])  # Phi(z) = 0.159, 0.5, 0.841, 0.977 with unit variance
    p, p_obs = m.calibration_curve(error, np.ones(4))
    assert p_obs[np.searchsorted(p, 0.5)] == 0.5  # 0.5 itself counts
    assert p_obs[0] == 0.0 and p_obs[-1] == 1.0


# --- NLL, CRPS, sharpness --------------------------------------------------------------------


def test_gaussian_nll_equals_minus_the_scipy_log_density():
    rng = np.random.default_rng(2)
    error, var = rng.normal(size=20), rng.uniform(0.1, 3.0, 20)
    expected = -np.mean(stats.norm.logpdf(error, scale=np.sqrt(var)))
    assert m.gaussian_nll(error, var) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("error, var", [(0.0, 1.0), (0.7, 0.25), (-2.5, 4.0), (3.0, 0.01)])
def test_gaussian_crps_equals_the_integral_of_the_squared_cdf_difference(error, var):
    """CRPS(F, y) = int (F(x) - 1[x >= y])^2 dx, here for a predictive N(0, var) and y = error."""
    sigma = np.sqrt(var)
    below, _ = integrate.quad(lambda x: stats.norm.cdf(x, scale=sigma) ** 2, -np.inf, error)
    above, _ = integrate.quad(lambda x: stats.norm.sf(x, scale=sigma) ** 2, error, np.inf)
    assert m.gaussian_crps(np.array([error]), np.array([var])) == pytest.approx(below + above, rel=1e-7)


def test_sharpness_is_the_root_mean_predicted_variance():
    assert m.sharpness(np.array([1.0, 4.0, 4.0])) == pytest.approx(np.sqrt(3.0))


# --- Spearman and AUROC ----------------------------------------------------------------------


def test_spearman_is_per_structure_and_one_for_a_monotone_relation():
    n_atoms = np.array([2, 3, 1, 2])
    per_structure_var = np.array([0.1, 0.4, 0.2, 0.9])
    v = np.repeat(per_structure_var, n_atoms)
    error = np.sqrt(v / 3.0)[:, None] * np.ones((len(v), 3))  # squared error equals variance per atom
    assert m.spearman(error, v, n_atoms) == pytest.approx(1.0)
    assert m.spearman(error[::-1], v, n_atoms) < 1.0
    assert m.spearman(error[:3], v[:3], np.array([3])) is None  # undefined for one structure


def test_auroc_is_one_on_separable_scores_and_one_half_on_identical_ones():
    assert m.auroc(np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.9])) == 1.0
    assert m.auroc(np.array([0.5, 0.9]), np.array([0.1, 0.2, 0.3])) == 0.0
    assert m.auroc(np.full(4, 0.3), np.full(3, 0.3)) == 0.5


def test_auroc_equals_the_pairwise_probability_with_ties_counting_one_half():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 5, 30).astype(float), rng.integers(2, 7, 20).astype(float)
    pairs = (b[None, :] > a[:, None]).mean() + 0.5 * (b[None, :] == a[:, None]).mean()
    assert m.auroc(a, b) == pytest.approx(pairs, rel=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        m.auroc(a, np.array([]))


# --- calibration -----------------------------------------------------------------------------


def test_the_closed_form_variance_scale_minimises_the_nll():
    error, v = gaussian_forces(seed=4, n_atoms=500, sigma_factor=0.3)
    err, var = components(error, v)
    s = fit_variance_scale(err, var)
    numeric = optimize.minimize_scalar(lambda x: m.gaussian_nll(err, x * var), bounds=(1e-3, 1e3), method="bounded")
    assert s == pytest.approx(numeric.x, rel=1e-4)
    assert s == pytest.approx(1 / 0.09, rel=0.1)  # sigma 0.3x too small: variance scale ~ 11
    assert m.gaussian_nll(err, s * var) < m.gaussian_nll(err, var)


def test_pool_adjacent_violators_gives_the_least_squares_nondecreasing_fit():
    y = np.array([1.0, 3.0, 2.0, 4.0, 3.0, 3.0, 5.0])
    np.testing.assert_allclose(pool_adjacent_violators(y), [1.0, 2.5, 2.5, 10 / 3, 10 / 3, 10 / 3, 5.0])
    np.testing.assert_allclose(pool_adjacent_violators(np.arange(5.0)), np.arange(5.0))
    np.testing.assert_allclose(pool_adjacent_violators([2.0, 0.0], [3.0, 1.0]), [1.5, 1.5])


def test_isotonic_recalibration_removes_the_ece_of_a_miscalibrated_fit_set():
    error, v = gaussian_forces(seed=5, n_atoms=2000, sigma_factor=0.5)
    err, var = components(error, v)
    iso = fit_isotonic(err, var)
    assert iso["x"][0] == 0.0 and iso["x"][-1] == 1.0 and iso["y"][0] == 0.0 and iso["y"][-1] == 1.0
    assert np.all(np.diff(iso["x"]) > 0) and np.all(np.diff(iso["y"]) >= 0)
    before = m.expected_calibration_error(err, var)
    after = m.expected_calibration_error(err, var, cdf_map=lambda u: apply_isotonic(u, iso))
    assert before > 0.1 and after < 0.005


def test_isotonic_variance_factor_is_one_for_the_identity_and_recovers_a_variance_scale():
    """For var predicted 2x too small (sigma / sqrt 2) the recalibrated second moment is ~2."""
    assert isotonic_variance_factor({"x": [0.0, 1.0], "y": [0.0, 1.0]}) == pytest.approx(1.0, abs=1e-6)
    error, v = gaussian_forces(seed=6, n_atoms=5000, sigma_factor=np.sqrt(0.5))
    iso = fit_isotonic(*components(error, v))
    assert isotonic_variance_factor(iso) == pytest.approx(2.0, rel=0.05)
    factors = variance_factors({"energy": 3.0, "forces": 0.5, "forces_isotonic": iso})
    assert factors["energy"] == 3.0 and factors["stress"] == 1.0
    assert factors["forces"] == pytest.approx(0.5 * isotonic_variance_factor(iso))


def test_the_calculator_applies_stored_isotonic_maps_and_rejects_malformed_ones(make_potential, ammonia):
    model = make_potential()
    iso = {"x": [0.0, 0.3, 1.0], "y": [0.0, 0.1, 1.0]}
    plain = BLIPCalculator(model, n_samples=4, seed=1).monte_carlo(ammonia)
    calc = BLIPCalculator(model, n_samples=4, seed=1, calibration={"forces": 2.0, "forces_isotonic": iso})
    assert calc.calibration["forces_isotonic"] == iso
    np.testing.assert_allclose(
        calc.monte_carlo(ammonia)["forces_variance"],
        2.0 * isotonic_variance_factor(iso) * plain["forces_variance"],
        rtol=1e-10,
    )
    for bad in ({"x": [0.0, 1.0]}, {"x": [0.0, 0.5, 0.4, 1.0], "y": [0.0, 0.2, 0.3, 1.0]}, {"x": [0, 1], "y": [1, 0]}):
        with pytest.raises(ValueError, match="forces_isotonic"):
            BLIPCalculator(model, calibration={"forces_isotonic": bad})
    with pytest.raises(ValueError, match="unknown calibration keys"):
        BLIPCalculator(model, calibration={"forces_quantiles": [0.1]})


def test_the_variance_scale_leaves_out_zero_variances_and_refuses_negative_ones():
    """An atom with no neighbour within the cutoff has zero force and zero variance (blip learn
    exported such fragmented frames): it carries no information about the scale."""
    error, variance = np.array([0.2, -0.1, 0.3, 0.5]), np.array([0.04, 0.01, 0.0, 0.25])
    assert fit_variance_scale(error, variance) == pytest.approx(np.mean([1.0, 1.0, 1.0]))
    iso = fit_isotonic(error, variance)
    assert np.isfinite(iso["x"]).all() and np.isfinite(iso["y"]).all()
    with pytest.raises(ValueError, match="negative or not finite"):
        fit_variance_scale(error, np.array([0.04, -0.01, 0.1, 0.2]))
    with pytest.raises(ValueError, match="every predicted variance is zero"):
        fit_variance_scale(error, np.zeros(4))


# --- power-law calibration -------------------------------------------------------------------


def test_the_power_law_map_is_monotone_and_equals_the_global_scale_for_gamma_one():
    v = np.array([0.0, 1e-4, 0.01, 0.3, 2.0, 50.0])
    np.testing.assert_allclose(apply_power(v, {"gamma": 1.0, "reference": 0.7}), v, rtol=1e-12)
    np.testing.assert_allclose(calibrated_forces_variance(v, {"forces": 2.5}), 2.5 * v)
    for gamma in (0.5, 1.7, 3.0):
        mapped = apply_power(v, {"gamma": gamma, "reference": 0.3})
        assert mapped[0] == 0.0 and np.all(np.diff(mapped) > 0)
        assert mapped[3] == pytest.approx(0.3)  # the reference variance is a fixed point
    calibration = {"forces": 2.0, "forces_power": {"gamma": 2.0, "reference": 0.3}}
    np.testing.assert_allclose(calibrated_forces_variance(v, calibration), 2.0 * v**2 / 0.3)


def test_fit_power_law_recovers_the_exponent_of_overconfident_large_variances():
    """Errors whose true variance grows as v^2 (the predicted v underestimates large variances,
    as away from the data): the fit finds gamma ~ 2 and beats the best single scale."""
    rng = np.random.default_rng(7)
    v = np.exp(rng.uniform(np.log(1e-3), np.log(1.0), 4000))
    true = 0.5 * v**2 / 0.1
    error = rng.normal(size=v.size) * np.sqrt(true)
    scale, power = fit_power_law(error, v)
    assert power["gamma"] == pytest.approx(2.0, abs=0.1)
    assert power["reference"] == pytest.approx(np.median(v))
    mapped = scale * apply_power(v, power)
    np.testing.assert_allclose(np.median(mapped / true), 1.0, rtol=0.15)
    assert m.gaussian_nll(error, mapped) < m.gaussian_nll(error, fit_variance_scale(error, v) * v) - 0.1
    calibrated_error, calibrated_v = gaussian_forces(seed=8, n_atoms=2000)
    _, power = fit_power_law(*components(calibrated_error, calibrated_v))
    assert power["gamma"] == pytest.approx(1.0, abs=0.1)  # nothing to correct: the global scale


def test_the_calculator_applies_a_stored_power_law_map_and_rejects_malformed_ones(make_potential, ammonia):
    model = make_potential()
    power = {"gamma": 1.5, "reference": 0.02}
    plain = BLIPCalculator(model, n_samples=4, seed=1).monte_carlo(ammonia)
    calc = BLIPCalculator(model, n_samples=4, seed=1, calibration={"forces": 2.0, "forces_power": power})
    assert calc.calibration["forces_power"] == power
    expected = 2.0 * 0.02 * (plain["forces_variance"] / 0.02) ** 1.5
    np.testing.assert_allclose(calc.monte_carlo(ammonia)["forces_variance"], expected, rtol=1e-10)
    for bad in ({"gamma": 1.5}, {"gamma": 0.0, "reference": 0.02}, {"gamma": 1.5, "reference": float("nan")}):
        with pytest.raises(ValueError, match="forces_power"):
            BLIPCalculator(model, calibration={"forces_power": bad})


def test_fit_power_law_with_structures_recovers_a_structure_term_that_one_exponent_cannot():
    """Structures whose atoms' true variances are ``v * m^1.5`` (``m``: the structure's mean ``v``):
    an atom of a structure that is uncertain everywhere errs more than the same ``v`` elsewhere.
    With ``structure`` the fit finds gamma ~ 1 and delta ~ 1.5 and beats the map without it;
    where the truth has no such term, delta stays ~ 0 (and never goes below 0)."""
    rng = np.random.default_rng(3)
    n_atoms = np.full(400, 10)
    level = np.repeat(np.exp(rng.uniform(np.log(1e-3), np.log(1.0), n_atoms.size)), n_atoms)
    v = level * rng.uniform(0.2, 1.8, level.size)  # per-atom variances around their structure's level
    m_struct = structure_means(v, n_atoms)
    for delta_true in (1.5, 0.0):
        error = rng.normal(size=v.size) * np.sqrt(0.5 * v * m_struct**delta_true)
        scale, power = fit_power_law(error, v, m_struct)
        assert power["gamma"] == pytest.approx(1.0, abs=0.15) and power["delta"] == pytest.approx(delta_true, abs=0.15)
        assert power["delta"] >= 0.0 and power["structure_reference"] == pytest.approx(np.median(m_struct))
    error = rng.normal(size=v.size) * np.sqrt(0.5 * v * m_struct**1.5)
    scale, power = fit_power_law(error, v, m_struct)
    plain_scale, plain = fit_power_law(error, v)
    nll_structure = m.gaussian_nll(error, scale * apply_power(v, power, n_atoms))
    assert nll_structure < m.gaussian_nll(error, plain_scale * apply_power(v, plain)) - 0.1


def test_the_structure_term_multiplies_by_the_structure_mean_and_keeps_the_map_monotone():
    v = np.array([0.1, 0.3, 0.2, 2.0, 4.0])
    n_atoms = np.array([3, 2])
    np.testing.assert_allclose(structure_means(v, n_atoms), [0.2, 0.2, 0.2, 3.0, 3.0])
    np.testing.assert_allclose(structure_means(v), np.full(5, v.mean()))
    power = {"gamma": 1.0, "reference": 1.0, "delta": 2.0, "structure_reference": 0.5}
    np.testing.assert_allclose(apply_power(v, power, n_atoms), v * np.repeat([0.4, 6.0], n_atoms) ** 2)
    bigger = v.copy()
    bigger[1] += 0.5  # raising one atom's variance raises (never lowers) every mapped variance of its structure
    assert np.all(apply_power(bigger, power, n_atoms) >= apply_power(v, power, n_atoms))
    assert validate_power("forces_power", power) == power
    for bad in ({**power, "delta": -0.1}, {**power, "structure_reference": 0.0}, {"gamma": 1.0, "reference": 1.0,
                                                                                  "delta": 1.0}):
        with pytest.raises(ValueError, match="forces_power"):
            validate_power("forces_power", bad)
