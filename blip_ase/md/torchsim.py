"""torch-sim model interface of a BLIP potential: :class:`BLIPModel`.

torch-sim (``torch-sim-atomistic``) integrates the systems of one ``SimState`` together. Its
integrators call :meth:`BLIPModel.forward` for the MAP energies and forces of every system in one
batched pass; :meth:`BLIPModel.monte_carlo` gives the Monte Carlo statistics of every system in
one batched pass too: the neighbour lists and alpha/beta of the configuration are reused from the
MAP pass of the same positions, and each system's samples are drawn from generators of its own
(:class:`~blip_ase.bayes.StructureNoise`), so a system's numbers do not depend on which other
systems share the batch. Units are ASE's (eV, Angstrom, amu, ``ase.units.fs``), which are
torch-sim's metal units.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from torch_sim.models.interface import ModelInterface
from torch_sim.state import SimState

from blip_ase.calculator import BLIPCalculator
from blip_ase.inference import Prepared


def state_structures(state: SimState) -> list[Atoms]:
    """The systems of ``state`` as ``Atoms`` (positions in Angstrom, no velocities)."""
    numbers = state.atomic_numbers.cpu().numpy()
    positions = state.positions.detach().to("cpu", torch.float64).numpy()
    cells = state.row_vector_cell.detach().to("cpu", torch.float64).numpy()
    bounds = np.concatenate([[0], np.cumsum(state.n_atoms_per_system.cpu().numpy())])
    pbc = bool(state.pbc)
    return [
        Atoms(numbers=numbers[a:b], positions=positions[a:b], cell=cells[k], pbc=pbc)
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


class BLIPModel(ModelInterface):
    """A :class:`~blip_ase.calculator.BLIPCalculator`'s model as a torch-sim model (MAP forces).

    Args:
        calculator: its inference engine (:attr:`~blip_ase.calculator.BLIPCalculator.engine`)
            supplies the model (its device and dtype), the variance calibration, the bound on atoms
            per batched Monte Carlo pass (``max_batch_atoms``) and the graph cache.

    Stress is not computed (the batched walkers run NVE and NVT).
    """

    def __init__(self, calculator: BLIPCalculator):
        super().__init__()
        self.calculator = calculator
        self.engine = calculator.engine
        self.potential = calculator.model
        self._device, self._dtype = self.potential.device, self.potential.dtype
        self._compute_forces, self._compute_stress = True, False

    @classmethod
    def from_checkpoint(cls, path: str | Path, **options: Any) -> BLIPModel:
        """The model stored at ``path``; ``options`` as for ``BLIPCalculator.from_checkpoint``."""
        return cls(BLIPCalculator.from_checkpoint(path, mode="map", **options))

    def prepare(self, state: SimState) -> Prepared:
        """The batched graph of ``state`` (neighbour lists once per configuration: cached by the
        engine until the positions, cells or systems change)."""
        key = (state.positions.detach(), state.cell.detach(), state.system_idx, state.atomic_numbers)
        prepared = self.engine.lookup(key)
        if prepared is None:
            prepared = self.engine.prepare(state_structures(state), key=tuple(t.clone() for t in key))
        return prepared

    def forward(self, state: SimState, **_: Any) -> dict[str, torch.Tensor]:
        """MAP ``energy (n_systems,)`` eV and ``forces (n_atoms, 3)`` eV/A of every system."""
        graph = self.prepare(state).graph
        with torch.enable_grad():
            out = self.potential.predict(graph, coefficients=None, noise=None, compute_stress=False)
        return {"energy": out["energy"][0].detach(), "forces": out["forces"][0].detach()}

    def monte_carlo(self, state: SimState, generators: list[torch.Generator], n_samples: int) -> list[dict]:
        """Monte Carlo statistics of every system of ``state`` in one batched pass.

        Args:
            state: the systems (their configuration's graph and alpha/beta are reused).
            generators: one per system: system ``k``'s ``n_samples`` noise seeds are drawn from
                ``generators[k]`` (as a :class:`~blip_ase.calculator.BLIPCalculator` draws them
                from its own generator).
            n_samples: S (a deep ensemble takes one sample per member).

        Returns:
            Per system, the calculator's Monte Carlo results (``energy``, ``forces``,
            ``energy_variance``, ``forces_variance``; calibrated), numpy on the CPU.
        """
        return self.engine.monte_carlo(self.prepare(state), n_samples, generators=generators, stress=False)
