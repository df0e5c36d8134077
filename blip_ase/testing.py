"""The backend contract's test battery: every :class:`~blip_ase.models.potential.Potential` runs
the same checks (in the spirit of torch-sim's ``testing.py`` and nequip's test mixins).

A new backend's author runs them on a small float64 model of their backend::

    from blip_ase import testing
    testing.check_forces_match_finite_differences(model, molecule, seed=11)
    testing.check_batched_samples_equal_sequential(model, periodic_cell)
    testing.check_descriptors(model, [molecule, other_molecule, periodic_cell], rotation=rotation)
    ...

(``tests/test_backends.py`` runs them for PaiNN, ORB v3 conservative and direct, MC dropout and
the deep ensemble.) Every check raises ``AssertionError`` with a message. Structures should be
small; a periodic one should keep its atoms away from the cell faces (an atom wrapped across a
face relabels its edges' lattice shifts, hence the order of their noise rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

from blip_ase.bayes import NoiseSource, StructureNoise, structure_sizes
from blip_ase.models.potential import Potential
from blip_ase.voigt import matrix_to_voigt

RESULT_KEYS = ("energy", "forces", "stress")


class FixedSample(Calculator):
    """ASE calculator of one fixed sample of ``model``: MAP (``seed=None``) or the sample of the
    noise seed ``seed``, with alpha/beta of the first configuration (``recompute=False``, the
    derivative at fixed coefficients) or recomputed at every configuration (``recompute=True``,
    the full derivative including alpha's dependence on the positions).

    Results: ``energy`` eV, ``forces (n, 3)`` eV/A, ``stress (6,)`` eV/A^3 (periodic cells).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: Potential, seed: int | None, *, recompute: bool = False):
        super().__init__()
        self.model, self.seed, self.recompute, self.coefficients = model, seed, recompute, None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        graph = self.model.build_graph(self.atoms)
        sampling = self.seed is not None
        if sampling and (self.coefficients is None or self.recompute):
            self.coefficients = self.model.coefficients(graph)
        stress = bool(self.atoms.pbc.all()) and self.model.implements_stress
        out = self.model(
            graph,
            coefficients=self.coefficients if sampling else None,
            noise=NoiseSource.from_seeds([self.seed]) if sampling else None,
            compute_stress=stress,
        )
        energy = float(out["energy"][0, 0].detach())
        self.results = {"energy": energy, "free_energy": energy, "forces": out["forces"][0].detach().cpu().numpy()}
        if stress:
            self.results["stress"] = matrix_to_voigt(out["stress"][0, 0]).detach().cpu().numpy()


def sample_outputs(model: Potential, atoms: Atoms, seeds: Sequence[int] | None, **kwargs) -> dict[str, torch.Tensor]:
    """``model``'s outputs for ``atoms``: MAP (``seeds=None``) or one sample per seed, in one pass."""
    graph = model.build_graph(atoms)
    noise = None if seeds is None else NoiseSource.from_seeds(list(seeds))
    coefficients = None if seeds is None else model.coefficients(graph)
    stress = bool(atoms.pbc.all()) and model.implements_stress
    out = model(graph, coefficients=coefficients, noise=noise, compute_stress=stress, **kwargs)
    return {k: v.detach() for k, v in out.items()}


def check_forces_match_finite_differences(
    model: Potential, atoms: Atoms, *, seed: int | None = None, recompute: bool = False, eps: float = 1e-4,
    atol: float = 1e-7,
) -> None:  # fmt: skip
    """Forces of MAP or of a fixed-noise sample are ``-dE/dr`` (central differences, eV/A).

    Only for conservative models (forces from the energy's gradient).
    """
    _check_derivative(model, atoms, "forces", seed=seed, recompute=recompute, eps=eps, atol=atol)


def check_stress_matches_finite_differences(
    model: Potential, atoms: Atoms, *, seed: int | None = None, recompute: bool = False, eps: float = 1e-5,
    atol: float = 1e-7,
) -> None:  # fmt: skip
    """Stress (ASE Voigt, eV/A^3) of MAP or of a fixed-noise sample is ``(1/V) dE/d(strain)``."""
    assert atoms.pbc.all(), "stress needs a periodic cell"
    _check_derivative(model, atoms, "stress", seed=seed, recompute=recompute, eps=eps, atol=atol)


def _check_derivative(model: Potential, atoms: Atoms, key: str, *, seed, recompute, eps, atol) -> None:
    atoms = atoms.copy()
    atoms.calc = FixedSample(model, seed, recompute=recompute)
    analytic = atoms.calc.get_property(key, atoms)
    assert np.abs(analytic).max() > 1e-4, f"{key} all but zero: the check would prove nothing"
    numerical = (calculate_numerical_forces if key == "forces" else calculate_numerical_stress)(atoms, eps=eps)
    np.testing.assert_allclose(analytic, numerical, atol=atol, err_msg=f"{key} is not the energy's derivative")


def check_result_keys_and_shapes(model: Potential, atoms: Atoms, *, seeds: Sequence[int] = (1, 2, 3)) -> None:
    """``energy (S, 1)``, ``forces (S, n, 3)`` and, for periodic cells, ``stress (S, 1, 3, 3)``,
    in the model's dtype, for MAP (``S = 1``) and for ``S = len(seeds)`` samples."""
    periodic = bool(atoms.pbc.all()) and model.implements_stress
    for s, chosen in ((1, None), (len(seeds), seeds)):
        out = sample_outputs(model, atoms, chosen)
        expected = {"energy": (s, 1), "forces": (s, len(atoms), 3)} | ({"stress": (s, 1, 3, 3)} if periodic else {})
        assert {k: tuple(v.shape) for k, v in out.items()} == expected, f"result shapes {out.keys()} for S = {s}"
        assert all(v.dtype == model.dtype for v in out.values()), "results must be in the model's dtype"
        assert all(bool(torch.isfinite(v).all()) for v in out.values()), "non-finite result"


def check_batched_samples_equal_sequential(
    model: Potential, atoms: Atoms, *, seeds: Sequence[int] = (3, 4, 5), rtol: float = 1e-9, atol: float = 1e-9
) -> None:
    """S samples in one batched pass equal S passes of one sample with the same noise seeds (for a
    model with ``sample_period > 1``, passes of that many samples: its chunks start there)."""
    batched = sample_outputs(model, atoms, seeds)
    step = model.sample_period
    for start in range(0, len(seeds), step):
        alone = sample_outputs(model, atoms, seeds[start : start + step])
        for key in batched:
            n = alone[key].shape[0]
            part = batched[key][start : start + n]
            torch.testing.assert_close(part, alone[key], rtol=rtol, atol=atol, msg=f"{key} of samples from {start}")


def structure_noise(model: Potential, graph, seeds: Sequence[Sequence[int]]) -> StructureNoise:
    """:class:`StructureNoise` for ``graph`` (a batch of ``G`` structures): ``seeds[s][g]``
    seeds sample ``s`` of structure ``g``; the edge and atom counts come from the graph."""
    edges, nodes = structure_sizes(model, graph, len(seeds[0]))
    generators = [[torch.Generator().manual_seed(int(seed)) for seed in row] for row in seeds]
    return StructureNoise(generators, edges, nodes)


def check_batched_structures_equal_separate(
    model: Potential, structures: Sequence[Atoms], *, seeds: Sequence[int] = (3, 4), rtol: float = 1e-9,
    atol: float = 1e-9,
) -> None:  # fmt: skip
    """A batch of structures (:meth:`Potential.batch`) gives each structure's MAP outputs and, with a
    :class:`StructureNoise`, its samples as if it were evaluated alone (what batched many-walker MD
    relies on)."""
    graphs = [model.build_graph(atoms) for atoms in structures]
    batch = model.batch(graphs)
    built = model.build_batch(structures)  # a backend may build the batch at once: same edges, same order
    x, y = (model.posterior_inputs(g) for g in (batch, built)) if model.posterior is not None else (None, None)
    if x is not None:
        assert torch.equal(x.edge_index, y.edge_index), "build_batch gives other edges than batch of build_graph"
        torch.testing.assert_close(x.edge_vector, y.edge_vector, rtol=0, atol=1e-12)
    stress = all(atoms.pbc.all() for atoms in structures) and model.implements_stress
    grid = [[1000 * seed + g for g in range(len(structures))] for seed in seeds]
    sampled = model.is_bayesian
    out = model(
        batch,
        coefficients=model.coefficients(batch) if sampled else None,
        noise=structure_noise(model, batch, grid) if sampled else None,
        compute_stress=stress,
    )
    first_atom = 0
    for g, graph in enumerate(graphs):
        alone = model(
            graph,
            coefficients=model.coefficients(graph) if sampled else None,
            noise=structure_noise(model, graph, [[row[g]] for row in grid]) if sampled else None,
            compute_stress=stress,
        )
        n = len(structures[g])
        parts = {"energy": out["energy"][:, g : g + 1], "forces": out["forces"][:, first_atom : first_atom + n]}
        if stress:
            parts["stress"] = out["stress"][:, g : g + 1]
        for key, value in parts.items():
            torch.testing.assert_close(value.detach(), alone[key].detach(), rtol=rtol, atol=atol,
                                       msg=f"{key} of structure {g} batched differs from alone")  # fmt: skip
        first_atom += n


def check_seeds(model: Potential, atoms: Atoms, *, stochastic: bool = True) -> None:
    """The same seeds give identical samples; other seeds give other samples (``stochastic``) or,
    for a model whose samples are a fixed set (an ensemble), the same ones; samples of one pass
    differ from each other."""
    first, again, other = (sample_outputs(model, atoms, s) for s in ([7, 8], [7, 8], [9, 10]))
    for key in first:
        assert torch.equal(first[key], again[key]), f"the same seeds gave different {key}"
        differs = bool((first[key] - other[key]).abs().max() > 1e-8)
        assert differs == stochastic, f"other seeds gave {'the same' if stochastic else 'other'} {key}"
    assert float((first["energy"][0] - first["energy"][1]).abs()) > 1e-8, "samples of one pass must differ"


def check_map_equals(
    model: Potential, atoms: Atoms, reference: Callable[[Atoms], dict], *, atol: float = 1e-10
) -> None:
    """MAP outputs equal ``reference(atoms)`` (the plain model's ``energy (1,)``, ``forces (n, 3)``
    and, for periodic cells, ``stress (3, 3)``): wrapping changes nothing without noise."""
    out = sample_outputs(model, atoms, None)
    ref = reference(atoms)
    for key, value in ref.items():
        torch.testing.assert_close(out[key][0].reshape(value.shape), value, rtol=0, atol=atol, msg=f"MAP {key}")


def check_rotation_and_translation(
    model: Potential, atoms: Atoms, *, rotation: np.ndarray | None, seeds: Sequence[int] | None = (1, 2),
    atol: float = 1e-8,
) -> None:  # fmt: skip
    """Translating (and, with ``rotation``, rotating) the input leaves every sample's energy
    unchanged and rotates its forces and stress (a fixed noise draw; exact for an equivariant
    model). ``rotation=None`` checks translation only (ORB v3 is not rotation equivariant)."""
    moved = atoms.copy()
    if rotation is not None:
        moved.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
        moved.positions = atoms.positions @ rotation.T
    moved.positions += np.array([0.31, -0.27, 0.12])
    r = torch.as_tensor(np.eye(3) if rotation is None else rotation, dtype=model.dtype)
    a, b = sample_outputs(model, atoms, seeds), sample_outputs(model, moved, seeds)
    torch.testing.assert_close(b["energy"], a["energy"], rtol=0, atol=atol, msg="energy changed")
    torch.testing.assert_close(b["forces"], a["forces"] @ r.T, rtol=0, atol=atol, msg="forces did not rotate")
    if "stress" in a:
        torch.testing.assert_close(b["stress"], r @ a["stress"] @ r.T, rtol=0, atol=atol, msg="stress did not rotate")


def check_bad_inputs(model: Potential, atoms: Atoms) -> None:
    """``build_graph`` refuses an element the model does not know (naming the known ones) and
    NaN positions, with ``ValueError``."""
    from ase.data import chemical_symbols

    unknown = next(z for z in range(1, 100) if z not in model.elements)
    bad = atoms.copy()
    bad.numbers[0] = unknown
    _expect_value_error(lambda: model.build_graph(bad), chemical_symbols[unknown])
    bad = atoms.copy()
    bad.positions[0, 0] = np.nan
    _expect_value_error(lambda: model.build_graph(bad), "NaN")


def _expect_value_error(call: Callable[[], object], fragment: str) -> None:
    try:
        call()
    except ValueError as exc:
        assert fragment in str(exc), f"the error {exc!r} does not name {fragment!r}"
        return
    raise AssertionError(f"no ValueError (expected one naming {fragment!r})")


def check_descriptors(
    model: Potential, structures: Sequence[Atoms], *, rotation: np.ndarray | None, atol: float = 1e-8
) -> None:
    """:meth:`Potential.descriptors` are ``(n_atoms, D)`` finite per-atom features, the same ``D``
    for every structure, without a recorded gradient; translating (and, with ``rotation``,
    rotating) a structure leaves them unchanged; in a batch each structure's rows equal its
    descriptors alone (batching does not mix structures); different structures differ.

    ``rotation=None`` checks translation only (ORB v3 is not rotation equivariant)."""
    assert model.implements_descriptors, f"{type(model).__name__} declares no descriptors"
    alone = [model.descriptors(model.build_graph(atoms)) for atoms in structures]
    widths = {d.shape[1] for d in alone}
    assert len(widths) == 1, f"descriptor widths differ between structures: {widths}"
    for atoms, d in zip(structures, alone):
        assert d.ndim == 2 and d.shape[0] == len(atoms), f"descriptors of {len(atoms)} atoms have shape {tuple(d.shape)}"
        assert not d.requires_grad, "descriptors must not record a gradient"
        assert bool(torch.isfinite(d).all()), "non-finite descriptors"
        moved = atoms.copy()
        if rotation is not None:
            moved.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
            moved.positions = atoms.positions @ rotation.T
        moved.positions += np.array([0.31, -0.27, 0.12])
        again = model.descriptors(model.build_graph(moved))
        torch.testing.assert_close(again, d, rtol=0, atol=atol, msg="descriptors changed under a rigid motion")
    batched = model.descriptors(model.batch([model.build_graph(atoms) for atoms in structures]))
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-9, atol=atol,
                               msg="descriptors in a batch differ from each structure's alone")  # fmt: skip
    if len(structures) > 1 and len(structures[0]) == len(structures[1]):
        gap = float((alone[0] - alone[1]).abs().max())
        assert gap > 1e-6, "two different structures have the same descriptors: they tell nothing apart"
