"""Noise-contrastive prior: the KL of unlabelled, perturbed copies of the training batch.

The ELBO's KL acts only on training structures, where the data term pulls alpha down, so
nothing tells the inference network to predict *more* noise anywhere else. Here the KL to the
prior is also evaluated on perturbed copies of each batch (every atom rattled by a Gaussian of
a random width, every structure uniformly stretched or compressed: the geometries hot MD
visits), with its own weight. With a small weight on the training structures the network then
learns little noise where data exist and the prior's noise away from them (noise-contrastive
priors, Hafner et al. 2019). No labels and no pass of the potential are needed: only the
inference network runs on the perturbed edge vectors.

With ``kind: modes`` a copy is instead a "hotter" sample of the training data themselves: the
principal displacement modes of the training structures of the same molecule (PCA of their
positions after rigid alignment, :func:`displacement_modes`), amplified by a random factor in
``[mode_scale_min, mode_scale]`` (temperature ~ factor^2 in the harmonic picture). This moves the
atoms as the data's own vibrations do (bonds stretched together, angles bent) rather than
independently, which is what a shift to hotter MD looks like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from blip_ase.bayes import Coefficients, PosteriorInputs, kl_divergence


@dataclass(frozen=True)
class ContrastiveConfig:
    """Perturbed copies on which the KL to the prior is evaluated (BLIP only: models without an
    inference network, deterministic or MC dropout, ignore it).

    Attributes:
        weight: weight of their KL in the loss (0: off). It is independent of ``bayes.kl_weight``,
            the weight of the KL on the training structures themselves.
        rattle_A: largest per-structure rattle width (A); each copy draws its width uniformly in
            ``[rattle_min_A, rattle_A]`` and moves every atom by a Gaussian of that standard
            deviation.
        rattle_min_A: smallest rattle width (A): copies closer to the data than this are not drawn.
        stretch: largest uniform stretch or compression; each copy scales all its edge vectors by
            a factor drawn uniformly in ``[1 - stretch, 1 + stretch]``.
        copies: perturbed copies per training structure and step.
        seed: seed of the perturbations (a generator of their own: the labelled batch, its
            order and its training noise are the same with or without them).
        kind: ``rattle`` (independent Gaussian moves of every atom, the default) or ``modes``
            (the training data's principal displacement modes, amplified: :func:`displacement_modes`).
            With ``modes``, a structure whose molecule (sequence of elements) has fewer than 2
            non-periodic training structures, or is periodic, gets a rattled copy instead.
        max_edge_A: only edges at most this long in the training structure get the contrastive
            KL (None: every edge); the others keep only the data's KL, a kept edge weighs as
            without the cut. Meant to stop the prior pushing up the noise of long, non-bonded
            pairs whose perturbed lengths stay plausible; on acac it did not help (docs).
        mode_scale_min, mode_scale: range of the amplification factor of the modes (``kind:
            modes``); a copy draws its factor uniformly in it and its displacement from the mean
            structure is ``factor * L z`` (``L L^T``: the training displacement covariance).
            1 reproduces the spread of the training data.
    """

    weight: float = 0.0
    rattle_A: float = 0.3
    rattle_min_A: float = 0.0
    stretch: float = 0.15
    copies: int = 1
    seed: int = 12345
    kind: Literal["rattle", "modes"] = "rattle"
    mode_scale_min: float = 1.5
    mode_scale: float = 4.0
    max_edge_A: float | None = None

    def __post_init__(self):
        if self.max_edge_A is not None and not (math.isfinite(self.max_edge_A) and self.max_edge_A > 0):
            raise ValueError(f"contrastive.max_edge_A must be a positive length (A) or null, got {self.max_edge_A!r}")
        rattle_ok = 0 <= self.rattle_min_A <= self.rattle_A
        if self.weight < 0 or not rattle_ok or not 0 <= self.stretch < 1 or self.copies < 1:
            raise ValueError(
                f"contrastive needs weight >= 0, 0 <= rattle_min_A <= rattle_A, 0 <= stretch < 1 and copies >= 1, "
                f"got {self}"
            )
        if self.kind not in ("rattle", "modes"):
            raise ValueError(f"contrastive kind must be 'rattle' or 'modes', got {self.kind!r}")
        if not 0 < self.mode_scale_min <= self.mode_scale:
            raise ValueError(
                f"contrastive needs 0 < mode_scale_min <= mode_scale, got {self.mode_scale_min} and {self.mode_scale}"
            )


@dataclass
class DisplacementModes:
    """Principal displacement modes of the training structures, per molecule.

    Attributes:
        groups: per molecule (the tuple of its atoms' element indices, in order), ``(mean, factor)``:
            ``mean (n, 3)`` the mean aligned structure (A, centred) and ``factor (3n, k)`` with
            ``factor @ factor.T`` the covariance of the aligned positions (A^2), float64.
    """

    groups: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def kabsch_align(positions: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``positions (n, 3)`` centred and rotated (proper rotation) onto the centred ``reference (n, 3)``."""
    p, q = positions - positions.mean(axis=0), reference - reference.mean(axis=0)
    u, _, vt = np.linalg.svd(p.T @ q)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return p @ (u @ np.diag([1.0, 1.0, d]) @ vt)


def displacement_modes(frames: Sequence, elements: Sequence[int]) -> DisplacementModes:
    """:class:`DisplacementModes` of the non-periodic ``frames`` (ASE ``Atoms``), grouped by their
    sequence of elements; groups of fewer than 2 structures are left out.

    Each group is aligned to its mean structure (Kabsch, three rounds from the first frame); the
    covariance of the aligned positions is diagonalised and its modes with an eigenvalue above
    ``1e-10`` of the largest are kept (rigid motions have none after alignment).
    """
    index = {int(z): k for k, z in enumerate(elements)}
    members: dict[tuple[int, ...], list[np.ndarray]] = {}
    for atoms in frames:
        if atoms.pbc.any():
            continue
        key = tuple(index[int(z)] for z in atoms.numbers)
        members.setdefault(key, []).append(np.asarray(atoms.positions, float))
    groups = {}
    for key, positions in members.items():
        if len(positions) < 2:
            continue
        mean = positions[0] - positions[0].mean(axis=0)
        for _ in range(3):
            aligned = np.stack([kabsch_align(p, mean) for p in positions])
            mean = aligned.mean(axis=0)
        disp = (aligned - mean).reshape(len(positions), -1)
        lam, vec = np.linalg.eigh(disp.T @ disp / (len(positions) - 1))
        keep = lam > 1e-10 * max(lam.max(), 1e-300)
        factor = vec[:, keep] * np.sqrt(lam[keep])
        groups[key] = (torch.from_numpy(mean), torch.from_numpy(factor))
    return DisplacementModes(groups)


def perturb_edge_vectors(
    x: PosteriorInputs, cfg: ContrastiveConfig, generator: torch.Generator, modes: DisplacementModes | None = None
) -> torch.Tensor:  # fmt: skip
    """``(E, 3)`` edge vectors of one perturbed copy of every structure in ``x``.

    Atom ``a`` of structure ``g`` moves by ``sigma_g * z_a`` (``z`` standard normal, ``sigma_g``
    uniform in ``[rattle_min_A, rattle_A]``) and every vector of ``g`` is then scaled by ``s_g``: the
    vectors of a real geometry, whatever the backend's sign convention. Edges are kept (the
    inference network has no cutoff of its own). Random numbers come from ``generator`` only.

    With ``cfg.kind == "modes"`` and ``modes``, a structure whose molecule is in ``modes`` instead
    gets the positions ``mean + f_g * factor @ w_g`` (``f_g`` uniform in ``[mode_scale_min,
    mode_scale]``, ``w_g`` standard normal: a sample of the training data's aligned distribution
    with displacements ``f_g`` times larger), and its edges the vectors between them, times
    ``s_g``. These are drawn after the rattle, structure by structure, from the same generator.
    """
    vec = x.edge_vector.detach()
    kw = {"generator": generator, "device": generator.device, "dtype": torch.float64}
    u = torch.rand(2, x.n_graphs, **kw)
    z = torch.randn(x.atom_graph.shape[0], 3, **kw)
    sigma = (cfg.rattle_min_A + (cfg.rattle_A - cfg.rattle_min_A) * u[0]).to(vec)
    scale = (1.0 + cfg.stretch * (2.0 * u[1] - 1.0)).to(vec)
    z = z.to(vec) * sigma[x.atom_graph, None]
    i, j = x.edge_index
    out = scale[x.atom_graph[i], None] * (vec + z[j] - z[i])
    if cfg.kind != "modes" or modes is None or not modes.groups:
        return out
    starts = np.concatenate([[0], np.cumsum(torch.bincount(x.atom_graph, minlength=x.n_graphs).tolist())]).astype(int)
    species, edge_graph = x.species.tolist(), x.atom_graph[i]
    for g in range(x.n_graphs):
        group = modes.groups.get(tuple(species[starts[g] : starts[g + 1]]))
        if group is None:
            continue
        mean, factor = group
        f = cfg.mode_scale_min + (cfg.mode_scale - cfg.mode_scale_min) * float(torch.rand(1, **kw))
        w = torch.randn(factor.shape[1], **kw).cpu()
        positions = (mean + f * (factor @ w).reshape(-1, 3)).to(vec)
        rows = torch.nonzero(edge_graph == g).flatten()
        out[rows] = scale[g] * (positions[j[rows] - starts[g]] - positions[i[rows] - starts[g]])
    return out


def contrastive_kl(
    model, graph, cfg: ContrastiveConfig, generator: torch.Generator, p0: float, *,
    weights: tuple[float, float] = (1.0, 1.0), modes: DisplacementModes | None = None,
) -> torch.Tensor:  # fmt: skip
    """KL to the prior of alpha (and of beta, when the node head sees the neighbourhood) on
    ``cfg.copies`` perturbed copies of ``graph`` (:func:`perturb_edge_vectors`, with ``modes`` for
    ``kind: modes``), averaged over edges (nodes) and copies and summed over layers by
    :func:`~blip_ase.bayes.kl_divergence` (with its ``weights``); a scalar tensor."""
    x = model.posterior_inputs(graph)
    posterior = model.posterior
    total = x.edge_vector.new_zeros(())
    mask = None if cfg.max_edge_A is None else x.edge_vector.detach().norm(dim=-1) <= cfg.max_edge_A
    for _ in range(cfg.copies):
        c = posterior(x.species, x.edge_index, perturb_edge_vectors(x, cfg, generator, modes))
        node = c.node if posterior.neighbourhood else c.node[:, :0]
        total = total + kl_divergence(Coefficients(c.edge, node), p0, weights=weights, edge_mask=mask)
    return total / cfg.copies
