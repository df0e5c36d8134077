"""BLIPCalculator: finite differences, agreement with the raw model, results contract, seeds,
caching, bad input and the documented Python API example, for BLIP, MC dropout and a deep ensemble alike.
Tiny float64 PaiNN models keep this file fast."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

from blip_ase import BLIPCalculator
from blip_ase.bayes import BayesConfig, NoiseSource
from blip_ase.models import PaiNNConfig, PaiNNPotential, save_checkpoint
from blip_ase.models.ensemble import EnsemblePotential
from blip_ase.voigt import matrix_to_voigt

ROOT = Path(__file__).resolve().parents[1]
MC_KEYS = {"energy", "free_energy", "forces", "energy_variance", "forces_variance"}


def make_model(elements=(1, 7, 42), bayesian: bool = True, seed: int = 0) -> PaiNNPotential:
    """A tiny float64 PaiNN with a non-constant inference network and nonzero references."""
    torch.manual_seed(seed)
    bayes = BayesConfig(hidden=8, n_hidden=1, n_rbf=8, p_init=0.2) if bayesian else None
    model = PaiNNPotential(list(elements), PaiNNConfig(n_features=8, n_interactions=2, n_rbf=8, cutoff=4.0), bayes)
    with torch.no_grad():
        model.reference_energies.copy_(-torch.arange(1.0, len(elements) + 1))
        if model.posterior is not None:  # heads start constant; make alpha depend on the input
            for head in (model.posterior.edge_head, model.posterior.node_head):
                head[-1].weight.normal_(0.0, 0.5)
    return model.double().eval()


def make_kind(kind: str) -> PaiNNPotential | EnsemblePotential:
    """BLIP, MC dropout or a 3-member deep ensemble, all tiny (the calculator tests run on each)."""
    if kind == "blip":
        return make_model()
    if kind == "mc_dropout":
        model = make_model(bayesian=False)
        dropout = PaiNNPotential(model.elements, model.config, BayesConfig(method="mc_dropout", dropout_p=0.2))
        dropout.load_state_dict(model.state_dict())
        return dropout.double().eval()
    return EnsemblePotential([make_model(bayesian=False, seed=k) for k in range(3)]).eval()


@pytest.fixture(params=["blip", "mc_dropout", "ensemble"])
def model_kind(request) -> str:
    return request.param


@pytest.fixture
def model(model_kind):
    """Every calculator test runs on each kind of uncertainty model unless marked BLIP_ONLY."""
    return make_kind(model_kind)


# Ensemble samples are its members: they are the same at every call and for every seed.
RANDOM_SAMPLES = pytest.mark.parametrize("model_kind", ["blip", "mc_dropout"], indirect=True)


@pytest.fixture
def nh3() -> Atoms:
    atoms = molecule("NH3")
    atoms.rattle(0.05, seed=3)
    return atoms


@pytest.fixture
def mo() -> Atoms:
    """8 Mo atoms in a triclinic (primitive bcc) periodic cell, rattled."""
    atoms = bulk("Mo", "bcc", a=2.9) * (2, 2, 2)
    atoms.rattle(0.05, seed=4)
    return atoms


def count_calls(monkeypatch, model) -> dict[str, int]:
    """Count neighbour-list builds and inference-network runs (``coefficients``) of ``model``."""
    counts = {"build_graph": 0, "posterior": 0}

    def counting(name: str, key: str):
        original = getattr(model, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(model, name, wrapper)

    counting("build_graph", "build_graph")
    counting("coefficients", "posterior")
    return counts


def samples_of(model, n_samples: int) -> int:
    """Samples an MC call takes: ``n_samples``, or one per member for an ensemble."""
    period = getattr(model, "sample_period", 1)
    return period if period > 1 else n_samples


def voigt(stress: torch.Tensor) -> np.ndarray:
    return matrix_to_voigt(stress.detach().numpy())


# --- physics: finite differences -------------------------------------------------------------


def test_map_forces_equal_numerical_forces_of_the_map_energy(model, nh3):
    nh3.calc = BLIPCalculator(model, mode="map")
    np.testing.assert_allclose(nh3.get_forces(), calculate_numerical_forces(nh3, 1e-5), atol=1e-7)


def test_map_forces_and_stress_equal_numerical_derivatives_in_a_triclinic_cell(model, mo):
    mo.calc = BLIPCalculator(model, mode="map")
    np.testing.assert_allclose(mo.get_forces(), calculate_numerical_forces(mo, 1e-5), atol=1e-7)
    np.testing.assert_allclose(mo.get_stress(), calculate_numerical_stress(mo, 1e-6), atol=1e-9)
    assert np.abs(mo.get_stress()).max() > 1e-4  # not trivially zero


# --- calculator vs raw model ----------------------------------------------------------------


def test_map_results_equal_the_raw_model_without_noise(model, mo):
    calc = BLIPCalculator(model, mode="map")
    calc.calculate(mo)
    out = model(model.build_graph(mo), compute_stress=True)
    assert calc.results["energy"] == pytest.approx(out["energy"][0, 0].item(), abs=1e-12)
    np.testing.assert_allclose(calc.results["forces"], out["forces"][0].detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(calc.results["stress"], voigt(out["stress"][0, 0]), atol=1e-12)


def test_mc_statistics_equal_the_raw_model_samples_with_calibration(model, mo):
    scales = {"energy": 2.0, "forces": 3.0, "stress": 0.5}
    calc = BLIPCalculator(model, n_samples=5, seed=7, calibration=scales)
    calc.calculate(mo)
    graph = model.build_graph(mo)
    noise = NoiseSource.spawn(torch.Generator().manual_seed(7), samples_of(model, 5))
    out = model(graph, coefficients=model.coefficients(graph), noise=noise, compute_stress=True)
    energy, forces = out["energy"][:, 0].detach().numpy(), out["forces"].detach().numpy()
    stress = np.stack([voigt(s) for s in out["stress"][:, 0]])
    r = calc.results
    assert r["energy"] == pytest.approx(energy.mean(), abs=1e-12)
    assert r["energy_variance"] == pytest.approx(2.0 * energy.var(ddof=1), rel=1e-10)
    np.testing.assert_allclose(r["forces"], forces.mean(0), atol=1e-12)
    np.testing.assert_allclose(r["forces_variance"], 3.0 * forces.var(0, ddof=1).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(r["stress"], stress.mean(0), atol=1e-12)
    np.testing.assert_allclose(r["stress_variance"], 0.5 * stress.var(0, ddof=1), rtol=1e-10, atol=1e-20)
    assert r["energy_variance"] > 0 and (r["forces_variance"] > 0).all()


def test_chunking_by_max_batch_atoms_does_not_change_the_samples(model, nh3):
    one_per_chunk = BLIPCalculator(model, n_samples=6, seed=1, keep_samples=True, max_batch_atoms=len(nh3))
    all_at_once = BLIPCalculator(model, n_samples=6, seed=1, keep_samples=True)
    a, b = one_per_chunk.monte_carlo(nh3), all_at_once.monte_carlo(nh3)
    np.testing.assert_allclose(a["forces_samples"], b["forces_samples"], atol=1e-12)
    np.testing.assert_allclose(a["energy_samples"], b["energy_samples"], atol=1e-12)


# --- results contract -----------------------------------------------------------------------


def test_mc_results_have_the_documented_keys_shapes_and_types(model, nh3, mo):
    calc = BLIPCalculator(model, n_samples=4, seed=0, keep_samples=True)
    calc.calculate(nh3, ["energy"])  # properties asked do not matter: one pass gives all
    r = calc.results
    assert set(r) == MC_KEYS | {"energy_samples", "forces_samples"}
    assert isinstance(r["energy"], float) and isinstance(r["energy_variance"], float)
    assert r["free_energy"] == r["energy"]
    assert r["forces"].shape == (4, 3) and r["forces_variance"].shape == (4,)
    n = samples_of(model, 4)
    assert r["energy_samples"].shape == (n,) and r["forces_samples"].shape == (n, 4, 3)
    np.testing.assert_allclose(r["forces_variance"], r["forces_samples"].var(0, ddof=1).sum(-1), rtol=1e-12)
    calc.calculate(mo)
    assert set(calc.results) == MC_KEYS | {"stress", "stress_variance", "energy_samples", "forces_samples"}
    assert calc.results["stress"].shape == (6,) and calc.results["stress_variance"].shape == (6,)
    for key in calc.results:
        assert key in BLIPCalculator.implemented_properties
        np.testing.assert_array_equal(calc.get_property(key, mo), calc.results[key])


def test_map_results_have_no_variance_keys_and_molecules_have_no_stress(model, nh3, mo):
    nh3.calc = BLIPCalculator(model, mode="map")
    nh3.get_potential_energy()
    assert set(nh3.calc.results) == {"energy", "free_energy", "forces"}
    for key in ("stress", "energy_variance", "forces_variance", "energy_samples"):
        with pytest.raises(PropertyNotImplementedError):
            nh3.calc.get_property(key, nh3)
    mo.calc = BLIPCalculator(model, mode="map")
    assert mo.get_stress().shape == (6,)
    assert set(mo.calc.results) == {"energy", "free_energy", "forces", "stress"}


def test_partially_periodic_cells_have_no_stress(model, mo):
    mo.pbc = [True, True, False]
    mo.calc = BLIPCalculator(model, n_samples=3, seed=0)
    with pytest.raises(PropertyNotImplementedError):
        mo.get_stress()
    assert "stress_variance" not in mo.calc.results


def test_asking_for_a_missing_key_does_not_redraw_the_samples(model, nh3):
    nh3.calc = BLIPCalculator(model, n_samples=3, seed=0)
    energy = nh3.get_potential_energy()
    with pytest.raises(PropertyNotImplementedError):
        nh3.get_stress()
    assert nh3.get_potential_energy() == energy


def test_one_atom_has_unsqueezed_forces_and_an_isolated_atom_feels_no_force(model, nh3):
    """An atom without neighbours inside the cutoff is valid: its own energy, zero force."""
    single = Atoms("H", positions=[[0.0, 0.0, 0.0]])
    single.calc = BLIPCalculator(model, mode="map")
    assert single.get_forces().shape == (1, 3)
    e_h = single.get_potential_energy()
    references = [float(m.reference_energies[0]) for m in getattr(model, "members", [model])]
    assert e_h == pytest.approx(np.mean(references), abs=1e-12)  # an ensemble: its members' mean
    far = nh3 + Atoms("H", positions=[[20.0, 0.0, 0.0]])
    far.calc = BLIPCalculator(model, mode="map")
    nh3.calc = BLIPCalculator(model, mode="map")
    assert far.get_potential_energy() == pytest.approx(nh3.get_potential_energy() + e_h, abs=1e-10)
    np.testing.assert_allclose(far.get_forces()[-1], 0.0, atol=1e-12)
    mc = BLIPCalculator(model, n_samples=3, seed=0).monte_carlo(single)
    assert mc["forces"].shape == (1, 3) and mc["forces_variance"].shape == (1,)


def test_atoms_are_not_modified(model, mo):
    before = mo.copy()
    mo.calc = BLIPCalculator(model, n_samples=3, seed=0)
    mo.get_forces()
    mo.calc.monte_carlo()
    assert mo == before and mo.info == before.info and set(mo.arrays) == set(before.arrays)


def test_float32_option_casts_the_model_and_results_stay_float64(nh3):
    model = make_model()
    calc = BLIPCalculator(model, n_samples=3, dtype="float32", device="cpu", seed=0)
    assert model.dtype == torch.float32 and calc.model.device.type == "cpu"
    nh3.calc = calc
    assert nh3.get_forces().dtype == np.float64


# --- seeds ----------------------------------------------------------------------------------


@RANDOM_SAMPLES
def test_same_seed_gives_the_same_sequence_and_other_seeds_differ(model, nh3):
    def sequence(seed):
        calc = BLIPCalculator(model, n_samples=4, seed=seed)
        return [calc.monte_carlo(nh3)["forces"] for _ in range(2)]

    a, b, c = sequence(3), sequence(3), sequence(4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[0], c[0])
    d, e = sequence(None), sequence(None)
    assert not np.allclose(d[0], e[0])


# --- caching --------------------------------------------------------------------------------


def test_map_then_monte_carlo_builds_the_neighbour_list_and_runs_the_posterior_once(model, mo, monkeypatch):
    counts = count_calls(monkeypatch, model)
    mo.calc = calc = BLIPCalculator(model, mode="map", n_samples=4, seed=0)
    forces = mo.get_forces()
    results = dict(calc.results)
    assert counts == {"build_graph": 1, "posterior": 0}  # MAP costs no inference network
    first, second = calc.monte_carlo(), calc.monte_carlo(mo)
    assert counts == {"build_graph": 1, "posterior": 1}
    assert set(first) == MC_KEYS | {"stress", "stress_variance"}
    if samples_of(model, 4) == 4:  # not an ensemble: fresh samples each call
        assert not np.allclose(first["forces"], second["forces"])
    assert calc.results.keys() == results.keys() and all(calc.results[k] is results[k] for k in results)
    np.testing.assert_array_equal(mo.get_forces(), forces)


def test_mc_mode_calculate_shares_the_monte_carlo_path_and_cache(model, nh3, monkeypatch):
    counts = count_calls(monkeypatch, model)
    nh3.calc = calc = BLIPCalculator(model, n_samples=4, seed=0)
    nh3.get_forces()
    calc.monte_carlo(n_samples=3)
    assert counts == {"build_graph": 1, "posterior": 1}
    assert set(calc.monte_carlo()) == MC_KEYS


def test_reset_clears_the_cached_neighbour_list_and_alpha_beta(nh3):
    """Before: after changing the posterior's weights and calling reset(), MC variances still
    came from the old alpha (the cache survived reset)."""
    model = make_model()
    nh3.calc = calc = BLIPCalculator(model, mode="map", n_samples=8, seed=0)
    nh3.get_forces()
    before = calc.monte_carlo()["forces_variance"]
    with torch.no_grad():
        model.posterior.edge_head[-1].bias.add_(2.0)  # larger dropout rates on every edge
        model.posterior.node_head[-1].bias.add_(2.0)
    calc.reset()
    calc.generator.manual_seed(0)
    after = calc.monte_carlo(nh3)["forces_variance"]
    fresh = BLIPCalculator(model, mode="map", n_samples=8, seed=0).monte_carlo(nh3)["forces_variance"]
    np.testing.assert_allclose(after, fresh)
    assert not np.allclose(after, before)


def test_changing_the_model_dtype_after_a_call_drops_the_cache(nh3):
    """Before: ``calc.model.float()`` after a MAP call made monte_carlo() fail with a dtype mismatch."""
    model = make_model()
    nh3.calc = calc = BLIPCalculator(model, mode="map", n_samples=4, seed=0)
    forces64 = nh3.get_forces()
    calc.model.float()
    stats = calc.monte_carlo()
    assert np.isfinite(stats["forces_variance"]).all()
    calc.reset()
    np.testing.assert_allclose(nh3.get_forces(), forces64, atol=1e-4)


def test_calibration_is_read_only_in_place_and_takes_effect_when_assigned(nh3):
    """Before: ``calc.calibration["forces"] = 4`` was accepted and silently ignored."""
    calc = BLIPCalculator(make_model(), n_samples=4, seed=0)
    with pytest.raises(TypeError):
        calc.calibration["forces"] = 4.0
    plain = calc.monte_carlo(nh3)["forces_variance"]
    calc.calibration = {"forces": 4.0}
    assert calc.calibration["forces"] == 4.0 and calc.calibration["energy"] == 1.0
    calc.generator.manual_seed(0)
    np.testing.assert_allclose(calc.monte_carlo(nh3)["forces_variance"], 4.0 * plain)
    with pytest.raises(ValueError, match="unknown calibration keys"):
        calc.calibration = {"force": 2.0}


@pytest.mark.parametrize("change", ["positions", "cell", "pbc", "numbers"])
def test_any_change_of_the_configuration_invalidates_results_and_cache(model, mo, monkeypatch, change):
    counts = count_calls(monkeypatch, model)
    mo.calc = BLIPCalculator(model, mode="map")
    energy = mo.get_potential_energy()
    mo.get_forces()
    assert counts["build_graph"] == 1
    if change == "positions":
        mo.positions[0, 0] += 0.01
    elif change == "cell":
        mo.set_cell(mo.cell * 1.01, scale_atoms=False)
    elif change == "pbc":
        mo.pbc = [True, True, False]
    else:
        mo.numbers[0] = 1
    assert mo.get_potential_energy() != pytest.approx(energy, abs=1e-10)
    assert counts["build_graph"] == 2


# --- bad input ------------------------------------------------------------------------------


def test_unknown_element_error_lists_the_model_elements(nh3):
    nh3.calc = BLIPCalculator(make_model(elements=(1, 7)), mode="map")
    nh3.numbers[0] = 8
    with pytest.raises(ValueError, match=r"unknown element.*'O'.*knows only \['H', 'N'\]"):
        nh3.get_potential_energy()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_infinite_positions_are_rejected(model, nh3, value):
    nh3.positions[1, 2] = value
    nh3.calc = BLIPCalculator(model, mode="map")
    with pytest.raises(ValueError, match=r"NaN or infinite.*atoms \[1\]"):
        nh3.get_forces()


def test_periodic_cell_with_zero_volume_is_rejected(model, mo):
    mo.set_cell([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 0]], scale_atoms=False)
    mo.calc = BLIPCalculator(model, n_samples=3, seed=0)
    with pytest.raises(ValueError, match="zero volume"):
        mo.get_potential_energy()


def test_empty_atoms_are_rejected(model):
    with pytest.raises(ValueError, match="no atoms"):
        BLIPCalculator(model, mode="map").monte_carlo(Atoms())


def test_bad_options_are_rejected(model):
    with pytest.raises(ValueError, match="mode"):
        BLIPCalculator(model, mode="ensemble")
    with pytest.raises(ValueError, match="dtype"):
        BLIPCalculator(model, dtype="float16")
    with pytest.raises(ValueError, match="n_samples"):
        BLIPCalculator(model, n_samples=1)
    with pytest.raises(ValueError, match="deterministic"):
        BLIPCalculator(make_model(bayesian=False), mode="mc")
    with pytest.raises(ValueError, match="calibration"):
        BLIPCalculator(model, calibration={"virial": 1.0})
    with pytest.raises(RuntimeError, match="no configuration"):
        BLIPCalculator(model).monte_carlo()


# --- checkpoints and the documented example -----------------------------------------------------


def test_from_checkpoint_uses_the_stored_calibration_unless_overridden(model, nh3, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, calibration={"energy": 4.0, "forces": 9.0})
    calc = BLIPCalculator.from_checkpoint(path, n_samples=4, seed=2, device="cpu")
    assert calc.calibration == {"energy": 4.0, "forces": 9.0, "stress": 1.0}
    plain = BLIPCalculator.from_checkpoint(path, n_samples=4, seed=2, calibration={})
    a, b = calc.monte_carlo(nh3), plain.monte_carlo(nh3)
    np.testing.assert_allclose(a["forces_variance"], 9.0 * b["forces_variance"], rtol=1e-10)
    assert a["energy_variance"] == pytest.approx(4.0 * b["energy_variance"], rel=1e-10)


def python_api_example() -> str:
    """The first python block after '## The calculator' in docs/python-api.md (formerly README's)."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    found = re.search(r"^## The calculator\s*$.*?```python\n(.*?)```", text, re.S | re.M)
    assert found, "docs/python-api.md has no '## The calculator' section with a ```python block"
    return found.group(1)


def test_the_python_api_example_runs_outside_the_repository(tmp_path, monkeypatch):
    """Runs the documented example as written, on the shipped checkpoint, from an empty directory."""
    code = python_api_example()
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/python-api.md:The calculator", "exec"), {"__name__": "python_api_example"})


def test_voigt_conversions_are_inverse_and_follow_ase_order():
    """One home for ASE's Voigt order (it was written out four times)."""
    from blip_ase.voigt import voigt_to_matrix

    atoms = bulk("Mo", "bcc", a=3.1) * (2, 1, 1)
    matrix = np.array([[1.0, 6.0, 5.0], [6.0, 2.0, 4.0], [5.0, 4.0, 3.0]])
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms.calc = SinglePointCalculator(atoms, stress=matrix)
    np.testing.assert_array_equal(matrix_to_voigt(matrix), atoms.get_stress(voigt=True))
    np.testing.assert_array_equal(voigt_to_matrix(matrix_to_voigt(matrix)), matrix)
    batch = torch.tensor(np.stack([matrix, 2 * matrix]))
    torch.testing.assert_close(voigt_to_matrix(matrix_to_voigt(batch)), batch)
