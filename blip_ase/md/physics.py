"""Physical checks of a monitored run: what the model's uncertainty cannot see.

A local model gives an atom with no neighbour inside its cutoff exactly zero force and zero
force variance, so a molecule that has fallen apart looks certain. These checks halt such a run,
each with its own name (``FrameReport.checks``, the history's ``check`` column, ``stop_check``
of ``summary.json``):

- ``fragmented``: a molecule's bond graph (atoms ``i``, ``j`` bonded when
  ``d_ij < bond_factor * (r_i + r_j)``, ``r`` the covalent radii of ``ase.data``) has split
  relative to the start structure, or an atom (of a molecule or a periodic cell) has no neighbour
  within the model's cutoff. Periodic cells use the second rule only.
- ``too_close``: two atoms closer than ``min_distance_factor * (r_i + r_j)``.
- ``temperature_runaway``: the instantaneous temperature above ``temperature_factor`` times the
  thermostat's target at ``temperature_checks`` consecutive checks.
- ``energy_jump``: the total energy per atom (Monte Carlo mean potential energy plus kinetic
  energy) changed by more than ``energy_jump_eV_per_atom`` between two consecutive checks.

The defaults were chosen not to fire on the shipped ammonia model's normal runs at 300-1200 K and
to fire when its NH3 dissociates. Measured with ``python md_scripts/physical_checks.py`` (10
``blip md`` runs, 300/600/900/1200 K x seeds, 2000 steps, 2026-12-03): the 7 runs that stay
intact need a bond factor of at most 1.21 (default 1.5), come no closer than 0.90 x the covalent
radii (default 0.5), stay below 1.70 x the target over 5 checks (default 3) and change their
total energy by at most 0.093 eV/atom between checks (default 0.5): 0 false positives; the 3
that dissociate all halt (2 fragmented, 1 force_std + energy_jump).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols, covalent_radii

CHECKS = ("fragmented", "too_close", "temperature_runaway", "energy_jump")


def _positive(name: str, value, *, integer: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not np.isfinite(value) or not value > 0 or (integer and int(value) != value):
        kind = "an integer >= 1" if integer else "a finite number > 0"
        raise ValueError(f"physical check {name} must be {kind} (or None to switch it off), got {value!r}")


@dataclass(frozen=True)
class PhysicalChecks:
    """Physical checks, each halting with its own reason; None (or False) switches one off.

    Attributes:
        enabled: False switches every check off (``physical: {enabled: false}`` in a config
            file, ``--no-physical-checks``).
        bond_factor: bonded when ``d_ij < bond_factor * (r_i + r_j)``; a molecule whose bond graph
            splits relative to the start has ``fragmented``. None: no bond-graph rule.
        isolated: an atom with no neighbour within the model cutoff has ``fragmented``.
        min_distance_factor: ``too_close`` below this fraction of the sum of covalent radii.
        temperature_factor: ``temperature_runaway`` above this multiple of the target temperature...
        temperature_checks: ...at this many consecutive checks.
        energy_jump_eV_per_atom: ``energy_jump`` when the total energy per atom changes by more
            than this between consecutive checks, eV/atom.

    Raises:
        ValueError: a value that is not a finite positive number (an integer for
            ``temperature_checks``), or ``min_distance_factor >= bond_factor``.
    """

    enabled: bool = True
    bond_factor: float | None = 1.5
    isolated: bool = True
    min_distance_factor: float | None = 0.5
    temperature_factor: float | None = 3.0
    temperature_checks: int = 5
    energy_jump_eV_per_atom: float | None = 0.5

    def __post_init__(self):
        for name in ("bond_factor", "min_distance_factor", "temperature_factor", "energy_jump_eV_per_atom"):
            _positive(name, getattr(self, name))
        _positive("temperature_checks", self.temperature_checks, integer=True)
        for name in ("enabled", "isolated"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"physical check {name} must be True or False, got {getattr(self, name)!r}")
        b, m = self.bond_factor, self.min_distance_factor
        if b is not None and m is not None and m >= b:
            raise ValueError(f"min_distance_factor {m:g} must be below bond_factor {b:g}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_value(cls, value: PhysicalChecks | Mapping | None) -> PhysicalChecks:
        """``value`` as checks: a mapping of fields (from JSON), None = all off (``enabled=False``)."""
        if value is None:
            return cls(enabled=False)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown physical check settings {unknown}")
            return cls(**value)
        return value


def pairs(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, d)`` of every ordered pair of atoms closer than ``cutoff`` (Angstrom), from one
    matscipy neighbour list (a padded open box around a molecule, as the model's graphs)."""
    from matscipy.neighbours import neighbour_list

    if atoms.pbc.any():
        return neighbour_list("ijd", atoms, cutoff)
    pos = atoms.positions
    box = np.diag(np.ptp(pos, axis=0) + 2.0 * cutoff + 1.0)
    return neighbour_list("ijd", positions=pos, cutoff=cutoff, cell=box, pbc=[False] * 3,
                          cell_origin=pos.min(axis=0) - cutoff)  # fmt: skip


def bond_fragments(atoms: Atoms, factor: float, near: tuple | None = None) -> np.ndarray:
    """``(n,)`` fragment label of each atom in the bond graph ``d_ij < factor * (r_i + r_j)``;
    ``near``: :func:`pairs` of ``atoms`` with a cutoff of at least ``factor * 2 max(r)``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    r = covalent_radii[atoms.numbers]
    i, j, d = pairs(atoms, factor * 2.0 * r.max()) if near is None else near
    bonded = d < factor * (r[i] + r[j])
    graph = coo_matrix((np.ones(int(bonded.sum())), (i[bonded], j[bonded])), shape=(len(atoms), len(atoms)))
    return connected_components(graph, directed=False)[1]


class PhysicalState:
    """The physical checks of one trajectory and what they remember between checks.

    Args:
        checks: the settings.
        reference: the start structure (its bond graph).
        cutoff_A: the model cutoff, Angstrom (None: no isolated-atom rule).
        target_K: the thermostat temperature, K (None or 0: no runaway check).
    """

    def __init__(self, checks: PhysicalChecks, reference: Atoms, *, cutoff_A: float | None, target_K: float | None):
        self.checks, self.cutoff_A, self.target_K = checks, cutoff_A, target_K
        self.molecule = not reference.pbc.any()
        self.reference = self.bonds = None
        if checks.bond_factor is not None and self.molecule:
            r = covalent_radii[reference.numbers]
            i, j, d = pairs(reference, checks.bond_factor * 2.0 * r.max())
            self.reference = bond_fragments(reference, checks.bond_factor, (i, j, d))
            keep = (i < j) & (d < checks.bond_factor * (r[i] + r[j]))
            self.bonds = np.stack([i[keep], j[keep]], axis=1)  # (n_bonds, 2) of the start structure
        self.reset()

    def reset(self) -> None:
        """Forget the previous energy and the run of hot checks (a fresh start)."""
        self.previous_energy: float | None = None
        self.hot_checks = 0

    def check(self, atoms: Atoms, *, energy_eV: float, temperature_K: float) -> list[tuple[str, str]]:
        """``(check, message)`` for every check that fires on ``atoms``.

        Args:
            atoms: the configuration.
            energy_eV: its total energy (potential + kinetic), eV; a non-finite one is skipped.
            temperature_K: its instantaneous temperature, K.
        """
        near = self.neighbours(atoms)
        fired = [self.fragmentation(atoms, near), self.too_close(atoms, near), self.runaway(temperature_K)]
        fired.append(self.energy_jump(energy_eV / len(atoms)))
        return [f for f in fired if f is not None]

    def neighbours(self, atoms: Atoms) -> tuple | None:
        """One :func:`pairs` list covering every distance check of this frame (None: none needs it)."""
        c, r_max = self.checks, float(covalent_radii[atoms.numbers].max())
        reach = [c.bond_factor * 2.0 * r_max if self.reference is not None else 0.0,
                 self.cutoff_A if c.isolated and self.cutoff_A is not None else 0.0,
                 c.min_distance_factor * 2.0 * r_max if c.min_distance_factor is not None else 0.0]  # fmt: skip
        return pairs(atoms, max(reach)) if max(reach) > 0 and len(atoms) > 1 else None

    def fragmentation(self, atoms: Atoms, near: tuple | None = None) -> tuple[str, str] | None:
        c = self.checks
        near = self.neighbours(atoms) if near is None else near
        if self.reference is not None:
            now = bond_fragments(atoms, c.bond_factor, near)
            split = [k for k in np.unique(self.reference) if len(np.unique(now[self.reference == k])) > 1]
            if split:
                return "fragmented", self.split_message(atoms, now)
        if c.isolated and self.cutoff_A is not None and len(atoms) > 1:
            i, _, d = near
            counts = np.bincount(i[d < self.cutoff_A], minlength=len(atoms))
            if (counts == 0).any():
                k = int(np.argmin(counts))
                symbol = chemical_symbols[atoms.numbers[k]]
                return "fragmented", (
                    f"fragmented: atom {k} {symbol} has no neighbour within the model cutoff {self.cutoff_A:g} A"
                )
        return None

    def split_message(self, atoms: Atoms, now: np.ndarray) -> str:
        """The most stretched bond of the start structure that the split broke."""
        broken = self.bonds[now[self.bonds[:, 0]] != now[self.bonds[:, 1]]]
        r = covalent_radii[atoms.numbers]
        d = np.linalg.norm(atoms.positions[broken[:, 0]] - atoms.positions[broken[:, 1]], axis=1)
        k = int(np.argmax(d / (r[broken[:, 0]] + r[broken[:, 1]])))
        i, j = (int(x) for x in broken[k])
        sym, limit = chemical_symbols, self.checks.bond_factor * (r[i] + r[j])
        return (
            f"fragmented: the bond graph split into {len(np.unique(now))} fragments (start "
            f"{len(np.unique(self.reference))}); atoms {i} {sym[atoms.numbers[i]]} and {j} {sym[atoms.numbers[j]]}, "
            f"bonded at the start, are {d[k]:.3g} A apart (bonded below {limit:.3g} A)"
        )

    def too_close(self, atoms: Atoms, near: tuple | None = None) -> tuple[str, str] | None:
        factor = self.checks.min_distance_factor
        if factor is None or len(atoms) < 2:
            return None
        i, j, d = self.neighbours(atoms) if near is None else near
        ratio = d / (covalent_radii[atoms.numbers[i]] + covalent_radii[atoms.numbers[j]])
        if not (ratio < factor).any():
            return None
        k = int(np.argmin(ratio))
        a, b = sorted((int(i[k]), int(j[k])))
        limit = factor * (covalent_radii[atoms.numbers[a]] + covalent_radii[atoms.numbers[b]])
        sym = chemical_symbols
        return "too_close", (
            f"too_close: atoms {a} {sym[atoms.numbers[a]]} and {b} {sym[atoms.numbers[b]]} are {d[k]:.3g} A apart "
            f"(< {factor:g} x covalent radii = {limit:.3g} A)"
        )

    def runaway(self, temperature_K: float) -> tuple[str, str] | None:
        factor, target = self.checks.temperature_factor, self.target_K
        if factor is None or not target:
            return None
        self.hot_checks = self.hot_checks + 1 if temperature_K > factor * target else 0
        if self.hot_checks < self.checks.temperature_checks:
            return None
        return "temperature_runaway", (
            f"temperature_runaway: T = {temperature_K:.0f} K, above {factor:g} x {target:g} K at "
            f"{self.hot_checks} consecutive checks"
        )

    def energy_jump(self, energy_per_atom: float) -> tuple[str, str] | None:
        bound = self.checks.energy_jump_eV_per_atom
        if bound is None or not np.isfinite(energy_per_atom):
            return None
        previous, self.previous_energy = self.previous_energy, energy_per_atom
        if previous is None or abs(energy_per_atom - previous) <= bound:
            return None
        return "energy_jump", (
            f"energy_jump: total energy changed by {energy_per_atom - previous:+.3g} eV/atom since the last check "
            f"(bound {bound:g})"
        )
