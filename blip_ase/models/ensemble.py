"""Deep ensemble (Lakshminarayanan et al. 2017) behind the same :class:`Potential` interface.

A Monte Carlo "sample" of an ensemble is a member: with a noise source of ``S`` samples,
sample ``s`` is member ``s % N`` (members are evaluated in MAP mode, each once per pass, and the
noise generators are not used). ``BLIPCalculator`` always asks for ``S = N`` (one sample per
member), so its mean and unbiased variance are the ensemble's own. The calculator starts every
chunk of a batched pass at a multiple of :attr:`EnsemblePotential.sample_period`.
MAP mode (no noise) returns the members' mean.

An ensemble is saved as an ordinary checkpoint (backend ``ensemble``; config holds every
member's backend and config; state_dict keys ``members.<k>.*``), so
``BLIPCalculator.from_checkpoint`` and ``blip md`` work unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from torch import nn

from blip_ase.bayes import NoiseSource
from blip_ase.models.potential import BACKENDS, Potential


def _graph_key(member: Potential) -> str:
    """Members whose configs agree apart from the Bayesian settings share one graph."""
    config = {k: v for k, v in member.config_dict().items() if k != "bayes"}
    return member.backend + json.dumps(config, sort_keys=True, default=str)


_NOT_TRAINABLE = "an ensemble is not trained as one model: train its members (blip train --ensemble N)"


class EnsemblePotential(Potential):
    """Mean and spread of ``N >= 2`` independently trained potentials of one backend.

    Args:
        members: potentials with the same backend and element list (their dtype is unified to
            the first member's).

    Raises:
        ValueError: fewer than two members, members of different backends, nested ensembles or
            members that disagree on the elements.
    """

    backend = "ensemble"

    def __init__(self, members: Sequence[Potential]):
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        backends = [m.backend for m in members]
        if "ensemble" in backends:
            raise ValueError("ensemble members cannot themselves be ensembles")
        if len(set(backends)) > 1:
            raise ValueError(f"ensemble members disagree on the backend: {backends}; all must be the same")
        for k, m in enumerate(members[1:], start=1):
            if list(m.elements) != list(members[0].elements):
                raise ValueError(
                    f"ensemble members disagree on the elements: member 0 knows {members[0].elements}, "
                    f"member {k} knows {m.elements}"
                )
        super().__init__(members[0].elements, None, cutoff=max(m.cutoff for m in members))
        dtype = members[0].dtype
        self.members = nn.ModuleList(m.to(dtype) for m in members)
        self.scale = self.scale.to(dtype)  # checkpoints read the model dtype from it; unused otherwise
        keys = [_graph_key(m) for m in members]
        self._graph_owner = [keys.index(key) for key in keys]  # member whose graph member k uses

    @property
    def is_bayesian(self) -> bool:
        """Yes: an ensemble gives Monte Carlo statistics (``mode="mc"``)."""
        return True

    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def sample_period(self) -> int:
        """Sample ``s`` is member ``s % sample_period``; batched chunks must start at multiples."""
        return len(self.members)

    @property
    def implements_stress(self) -> bool:  # type: ignore[override]  # a ClassVar on the base
        return all(m.implements_stress for m in self.members)

    def config_dict(self) -> dict:
        return {
            "elements": self.elements,
            "members": [{"backend": m.backend, "config": m.config_dict()} for m in self.members],
        }

    @classmethod
    def from_config(cls, config: dict) -> EnsemblePotential:
        return cls([BACKENDS[m["backend"]].from_config(m["config"]) for m in config["members"]])

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path], *, device: torch.device | str = "cpu") -> EnsemblePotential:
        """Ensemble of the models stored at ``paths`` (their calibration is not used)."""
        from blip_ase.models.checkpoint import load_checkpoint

        return cls([load_checkpoint(p, device=device)[0] for p in paths])

    def build_graph(self, atoms: Atoms) -> list[Any]:
        """One graph per member (members with the same architecture share the object)."""
        graphs: list[Any] = []
        for k, owner in enumerate(self._graph_owner):
            graphs.append(self.members[k].build_graph(atoms) if owner == k else graphs[owner])
        return graphs

    def batch(self, graphs: list[list[Any]]) -> list[Any]:
        """Each member's graphs batched by the member (shared graphs stay shared)."""
        batched: list[Any] = []
        for k, owner in enumerate(self._graph_owner):
            batched.append(self.members[k].batch([g[k] for g in graphs]) if owner == k else batched[owner])
        return batched

    @property
    def implements_descriptors(self) -> bool:  # type: ignore[override]  # a ClassVar on the base
        return all(m.implements_descriptors for m in self.members)

    def descriptors(self, graph: list[Any]) -> torch.Tensor:
        """:meth:`Potential.descriptors`: the members' descriptors side by side ``(N, sum D_k)``."""
        return torch.cat([m.descriptors(g) for m, g in zip(self.members, graph)], dim=-1)

    def coefficients(self, graph: list[Any], *, jacobian: bool = True) -> None:
        """An ensemble has no noise coefficients (the member index is the randomness)."""
        return None

    def make_dataset(self, frames: list[Atoms], *, use_stress: bool = False, name: str = "data") -> Any:
        raise NotImplementedError(_NOT_TRAINABLE)

    def fit_normalisation(self, frames: list[Atoms], energies: np.ndarray, forces: np.ndarray) -> None:
        raise NotImplementedError(_NOT_TRAINABLE)

    def forward(  # the signature of Potential.forward
        self, graph: list[Any], *, coefficients: Any = None, noise: NoiseSource | None = None,
        compute_forces: bool = True, compute_stress: bool = False, create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Outputs of ``S = noise.n_samples`` samples (sample ``s`` = member ``s % N``), or with
        ``noise=None`` the members' mean (``S = 1``).

        Returns:
            ``energy (S, G)`` eV; ``forces (S, N_atoms, 3)`` eV/A; ``stress (S, G, 3, 3)`` eV/A^3,
            as for :meth:`Potential.forward`.
        """
        n = len(self.members)
        wanted = range(n) if noise is None else sorted({s % n for s in range(noise.n_samples)})
        outs = {
            k: self.members[k](
                graph[k], compute_forces=compute_forces, compute_stress=compute_stress, create_graph=create_graph
            )
            for k in wanted
        }
        if noise is None:
            return {key: torch.stack([o[key] for o in outs.values()]).mean(dim=0) for key in outs[0]}
        order = [s % n for s in range(noise.n_samples)]
        return {key: torch.cat([outs[k][key] for k in order]) for key in outs[order[0]]}
