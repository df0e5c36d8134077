"""LLPR (last-layer prediction rigidity): closed-form variances of a deterministic model.

The variances are checked against an explicit numpy computation whose feature Jacobians come
from finite differences, so neither the autograd loop nor the einsums are trusted twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read, write
from conftest import build_potential

from blip_ase import BLIPCalculator
from blip_ase.cli.main import main as blip
from blip_ase.inference.llpr import feature_jacobians, validate_llpr
from blip_ase.models import save_checkpoint
from blip_ase.models.checkpoint import load_checkpoint
from blip_ase.models.ensemble import EnsemblePotential
from blip_ase.uq.evaluate import model_method, read_labelled
from blip_ase.uq.llpr import covariance, fit_llpr, last_layer_rows, last_layer_weights

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ammonia"
ALPHA2 = 2.5


def random_llpr(d: int, seed: int = 0) -> dict:
    """LLPR data with a random symmetric positive definite ``Sigma`` and ``alpha^2 = ALPHA2``."""
    a = np.random.default_rng(seed).normal(size=(d, d))
    return {"inverse_covariance": (a @ a.T / d + 0.1 * np.eye(d)).tolist(), "n_features": d, "scale": ALPHA2}


def features_np(model, atoms) -> np.ndarray:
    """``(D,)`` last-layer features of one structure, numpy."""
    with torch.no_grad():
        return model.last_layer_features(model.build_graph(atoms))[0].numpy()


def numeric_jacobian(model, atoms, h: float = 1e-5) -> np.ndarray:
    """``(n, 3, D)`` central differences of the features with respect to the positions."""
    jac = []
    for k in range(len(atoms)):
        for c in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[k, c] += h
            minus.positions[k, c] -= h
            jac.append((features_np(model, plus) - features_np(model, minus)) / (2 * h))
    return np.array(jac).reshape(len(atoms), 3, -1)


def numeric_strain_jacobian(model, atoms, h: float = 1e-5) -> np.ndarray:
    """``(3, 3, D)`` central differences with respect to a (non-symmetric) strain ``x -> x (1 + e)``."""
    jac = np.zeros((3, 3, len(features_np(model, atoms))))
    for i in range(3):
        for j in range(3):
            parts = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[i, j] += sign * h
                strained = atoms.copy()
                strained.set_cell(atoms.cell.array @ strain, scale_atoms=False)
                strained.positions = atoms.positions @ strain
                parts.append(features_np(model, strained))
            jac[i, j] = (parts[0] - parts[1]) / (2 * h)
    return jac


def test_the_map_energy_is_the_last_layer_weights_times_the_features(ammonia, mo_cell):
    """``E = w . f + sum E_ref`` exactly and ``F = -w . df/dr``: the features are dE/dw."""
    model = build_potential(None)
    model.reference_energies.copy_(torch.tensor([-0.5, -2.0, -3.0], dtype=torch.float64))
    w = torch.as_tensor(last_layer_weights(model))
    for atoms in (ammonia, mo_cell):
        graph = model.build_graph(atoms)
        out = model.predict(graph, coefficients=None, noise=None, compute_stress=False)
        f, jac, _ = feature_jacobians(model, graph)
        e_ref = model.reference_energies[graph.species].sum()
        assert out["energy"][0, 0].item() == pytest.approx(float(f[0] @ w + e_ref), abs=1e-10)
        np.testing.assert_allclose(out["forces"][0].numpy(), -(jac @ w).numpy(), atol=1e-10)


def test_llpr_variances_equal_the_closed_form_with_finite_difference_jacobians(ammonia):
    model = build_potential(None)
    model.llpr = random_llpr(4)
    sigma = np.array(model.llpr["inverse_covariance"])
    f, jac = features_np(model, ammonia), numeric_jacobian(model, ammonia)
    calc = BLIPCalculator(model, mode="mc", calibration={"energy": 3.0, "forces": 0.5})
    calc.calculate(ammonia)
    res = calc.results
    assert res["energy_variance"] == pytest.approx(3.0 * ALPHA2 * f @ sigma @ f, rel=1e-8)
    expected = 0.5 * ALPHA2 * np.einsum("kci,ij,kcj->k", jac, sigma, jac)
    np.testing.assert_allclose(res["forces_variance"], expected, rtol=1e-6)
    map_calc = BLIPCalculator(model, mode="map")
    assert res["energy"] == map_calc.get_potential_energy(ammonia)
    np.testing.assert_allclose(res["forces"], map_calc.get_forces(ammonia))


def test_llpr_stress_variance_of_a_periodic_cell_equals_the_closed_form(mo_cell):
    model = build_potential(None)
    model.llpr = random_llpr(4, seed=1)
    sigma = np.array(model.llpr["inverse_covariance"])
    strain_jac = numeric_strain_jacobian(model, mo_cell)
    sym = 0.5 * (strain_jac + strain_jac.transpose(1, 0, 2)) / mo_cell.get_volume()
    voigt = sym[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # (6, D), ASE order xx yy zz yz xz xy
    res = BLIPCalculator(model, mode="mc").monte_carlo(mo_cell)
    np.testing.assert_allclose(res["stress_variance"], ALPHA2 * np.einsum("vi,ij,vj->v", voigt, sigma, voigt),
                               rtol=1e-5, atol=1e-14)  # fmt: skip
    assert res["stress"].shape == (6,) and res["forces_variance"].shape == (len(mo_cell),)


def test_llpr_variances_are_invariant_under_rotation_and_translation(ammonia, rotation):
    model = build_potential(None)
    model.llpr = random_llpr(4)
    calc = BLIPCalculator(model, mode="mc")
    before = calc.monte_carlo(ammonia)
    moved = ammonia.copy()
    moved.positions = ammonia.positions @ rotation.T + [1.0, -2.0, 0.5]
    after = calc.monte_carlo(moved)
    assert after["energy_variance"] == pytest.approx(before["energy_variance"], rel=1e-9)
    np.testing.assert_allclose(after["forces_variance"], before["forces_variance"], rtol=1e-8)
    np.testing.assert_allclose(after["forces"], before["forces"] @ rotation.T, atol=1e-10)


def test_the_fitted_covariance_and_scale_equal_their_numpy_formulas(ammonia):
    """The linear model on the last layer: C, Sigma = (C + sigma^2 I)^-1 and the NLL-optimal
    alpha^2 recomputed by hand from finite-difference Jacobians and the documented row weights."""
    model = build_potential(None)
    frames = []
    for k in range(6):
        atoms = ammonia.copy()
        atoms.rattle(0.05, seed=10 + k)
        frames.append(atoms)
    rng = np.random.default_rng(0)
    calc = BLIPCalculator(model, mode="map")
    labels = [{"energy": calc.get_potential_energy(a) + rng.normal(0, 0.01),
               "forces": calc.get_forces(a) + rng.normal(0, 0.05, (len(a), 3))} for a in frames]  # fmt: skip
    train, val = (frames[:3], labels[:3]), (frames[3:], labels[3:])
    val = (val[0] * 2, val[1] * 2)  # 6 structures (>= 5)
    data = fit_llpr(model, train, val, regularizer=1e-3)
    f = np.array([features_np(model, a) for a in train[0]])
    jac = np.concatenate([numeric_jacobian(model, a) for a in train[0]])
    w = last_layer_weights(model)
    e_err = np.array([lab["energy"] for lab in train[1]]) - (f @ w + model.reference_energies[[1, 0, 0, 0]].sum().item())
    f_err = np.concatenate([lab["forces"] for lab in train[1]]) + np.einsum("kcd,d->kc", jac, w)
    w_e, w_f = 1 / np.mean((e_err / 4) ** 2), 1 / np.mean(f_err**2)
    assert data["energy_weight"] == pytest.approx(w_e, rel=1e-5)
    assert data["forces_weight"] == pytest.approx(w_f, rel=1e-5)
    c = w_e * (f / 4).T @ (f / 4) + w_f * jac.reshape(-1, 4).T @ jac.reshape(-1, 4)
    sigma2 = 1e-3 * np.trace(c) / 4
    sigma = np.linalg.inv(c + sigma2 * np.eye(4))
    np.testing.assert_allclose(data["inverse_covariance"], sigma, rtol=1e-4)
    v_jac = np.concatenate([numeric_jacobian(model, a) for a in val[0]])
    v_err = np.concatenate([lab["forces"] for lab in val[1]]) + np.einsum("kcd,d->kc", v_jac, w)
    component_var = np.repeat(np.einsum("kci,ij,kcj->k", v_jac, sigma, v_jac) / 3, 3)
    assert data["scale"] == pytest.approx(np.mean(v_err.ravel() ** 2 / component_var), rel=1e-4)
    rows = last_layer_rows(model, train[0])
    np.testing.assert_allclose(covariance(rows, w_e, w_f), c, rtol=1e-4)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A deterministic and a Bayesian tiny checkpoint and small slices of the ammonia splits."""
    out = tmp_path_factory.mktemp("llpr")
    train, val, ood = (read(EXAMPLE / f"{n}.extxyz", ":") for n in ("train", "val", "ood"))
    paths = {name: out / f"{name}.extxyz" for name in ("train", "val", "test", "ood", "no_forces")}
    for name, frames in (("train", train[:12]), ("val", val[:6]), ("test", val[6:12]), ("ood", ood[:6])):
        write(paths[name], frames, format="extxyz")
    no_forces = [a.copy() for a in val[:6]]
    for atoms in no_forces:
        atoms.info["energy"] = 0.0
    write(paths["no_forces"], no_forces, format="extxyz")
    det = build_potential(None)
    det.elements = [1, 7, 42]
    paths["det"], paths["blip"] = out / "det.pt", out / "blip.pt"
    save_checkpoint(paths["det"], det)
    save_checkpoint(paths["blip"], build_potential())
    return paths


def test_blip_llpr_writes_a_checkpoint_that_eval_calibrate_and_the_calculator_use(files, tmp_path, capsys):
    llpr = tmp_path / "llpr.pt"
    assert blip(["llpr", "--model", str(files["det"]), "--train", str(files["train"]), "--val",
                 str(files["val"]), "--out", str(llpr)]) == 0  # fmt: skip
    assert "scale alpha^2" in capsys.readouterr().out
    model, ckpt = load_checkpoint(llpr)
    assert model_method(model) == "llpr" and validate_llpr(ckpt["llpr"])["n_features"] == 4
    assert ckpt["training"]["llpr_fit"]["n_train"] == 12
    out = tmp_path / "eval"
    assert blip(["eval", "--model", str(llpr), "--data", str(files["test"]), "--ood", str(files["ood"]),
                 "--out", str(out), "--no-plots", "--no-progress"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "llpr" and metrics["n_samples"] is None
    for key in ("spearman", "forces_ece", "forces_nll", "forces_mae"):
        assert np.isfinite(metrics["id"][key]) and np.isfinite(metrics["ood"][key])
    assert 0.0 <= metrics["auroc"] <= 1.0
    calibrated = tmp_path / "cal.pt"
    assert blip(["calibrate", "--model", str(llpr), "--data", str(files["val"]), "--out", str(calibrated),
                 "--no-progress"]) == 0  # fmt: skip
    calc = BLIPCalculator.from_checkpoint(calibrated, mode="mc", device="cpu")
    assert calc.model.llpr == ckpt["llpr"]
    atoms = read(files["test"], "0")
    result = calc.monte_carlo(atoms, n_samples=2)
    assert result["forces_variance"].shape == (len(atoms),) and (result["forces_variance"] > 0).all()


def test_blip_llpr_refuses_a_bayesian_checkpoint(files, tmp_path, capsys):
    code = blip(["llpr", "--model", str(files["blip"]), "--train", str(files["train"]), "--val",
                 str(files["val"]), "--out", str(tmp_path / "x.pt")])  # fmt: skip
    assert code == 2
    assert "LLPR is fitted post hoc on a deterministic model; this is a Bayesian" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_blip_llpr_refuses_data_without_forces_naming_the_frame(files, tmp_path, capsys):
    code = blip(["llpr", "--model", str(files["det"]), "--train", str(files["no_forces"]), "--val",
                 str(files["val"]), "--out", str(tmp_path / "x.pt")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "LLPR training data" in err and "frame 0" in err and "forces" in err


def test_backends_without_last_layer_features_name_llpr_and_fitting_refuses_them(ammonia):
    members = [build_potential(None, seed=s) for s in (0, 1)]
    ensemble = EnsemblePotential(members)
    with pytest.raises(NotImplementedError, match="LLPR"):
        ensemble.last_layer_features(ensemble.build_graph(ammonia))
    frames, labels = [ammonia] * 5, [{"energy": 0.0, "forces": np.zeros((4, 3))}] * 5
    with pytest.raises(ValueError, match="deterministic model"):
        fit_llpr(ensemble, (frames, labels), (frames, labels))


def test_bad_llpr_data_is_refused_with_a_clear_message():
    good = random_llpr(3)
    with pytest.raises(ValueError, match="lacks the keys"):
        validate_llpr({"n_features": 3})
    with pytest.raises(ValueError, match=r"shape \(3, 3\), n_features 4"):
        validate_llpr({**good, "n_features": 4})
    with pytest.raises(ValueError, match="positive"):
        validate_llpr({**good, "scale": 0.0})


def test_a_checkpoint_without_llpr_reads_as_none_and_mc_mode_still_needs_uncertainty(tmp_path):
    path = tmp_path / "det.pt"
    save_checkpoint(path, build_potential(None))
    model, ckpt = load_checkpoint(path)
    assert ckpt["llpr"] is None and model.llpr is None and model_method(model) == "deterministic"
    with pytest.raises(ValueError, match="LLPR"):
        BLIPCalculator(model, mode="mc")
    frames, labels = read_labelled(EXAMPLE / "val.extxyz")
    assert len(frames) == len(labels)


def test_blip_md_runs_with_an_llpr_checkpoint_and_records_its_force_stds(files, tmp_path, capsys):
    """The monitor calls ``calc.monte_carlo(atoms, n_samples=...)``; with LLPR it gets closed-form
    variances, so monitored MD works on a deterministic model after ``blip llpr``."""
    from blip_ase.md import read_history

    llpr = tmp_path / "llpr.pt"
    assert blip(["llpr", "--model", str(files["det"]), "--train", str(files["train"]), "--val",
                 str(files["val"]), "--out", str(llpr)]) == 0  # fmt: skip
    nh3 = Path(__file__).resolve().parents[1] / "blip_ase" / "assets" / "ammonia_nh3.xyz"
    out = tmp_path / "md"  # blip llpr stores no calibration reference: thresholds in eV/A
    assert blip(["md", "--model", str(llpr), "--structure", str(nh3), "--out", str(out), "--steps", "10",
                 "--uq-interval", "5", "--flag-force-std-eV-per-A", "0.25", "--halt-force-std-eV-per-A", "100",
                 "--no-progress", "--no-plot"]) == 0  # fmt: skip
    rows = read_history(out / "uncertainty.csv")
    assert [r["step"] for r in rows] == [0, 5, 10]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
