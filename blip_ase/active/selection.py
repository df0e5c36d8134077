"""Which flagged frames to label: uncertainty first, with diversity.

The descriptor of a structure is the mean over its atoms of the model's invariant per-atom
features (:meth:`blip_ase.models.Potential.descriptors`, MAP; PaiNN: the scalar features entering
the readout; ORB v3: the last node features), divided by ``sqrt(D)`` so that distances are RMS
differences per feature whatever the model's width. Strategies:

- ``fps``: uncertainty-weighted farthest-point sampling: the most uncertain frame first, then
  repeatedly the frame maximising ``distance to the chosen (and already labelled) frames x
  uncertainty / max uncertainty``;
- ``max_variance``: highest uncertainty first;
- ``random``: uniform without replacement (a baseline; no duplicate filter).

``fps`` and ``max_variance`` drop near-duplicates: frames closer than ``min_distance`` to a
chosen or an already labelled frame.

With ``select.descriptor: atoms`` FPS compares atoms instead of mean-pooled frames (the
per-atom features are divided by ``sqrt(D)`` as well): the distance of a frame to a set of frames
is the largest, over its atoms, of the distance to the nearest atom of the same element in the
set. One unusual group in an otherwise ordinary molecule then counts in full, where the mean over
atoms dilutes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from blip_ase.active.config import SelectConfig


@dataclass(frozen=True)
class AtomDescriptors:
    """Per-atom descriptors of a list of frames: ``features (A, D)`` (divided by ``sqrt(D)``),
    ``species (A,)`` atomic numbers and ``owner (A,)`` the index of each atom's frame, frames in
    order and contiguous; ``n_frames`` frames."""

    features: np.ndarray
    species: np.ndarray
    owner: np.ndarray
    n_frames: int

    def __len__(self) -> int:
        return self.n_frames


def descriptors(
    model, frames: Sequence[Atoms], *, batch_atoms: int = 2048, per_atom: bool = False
) -> np.ndarray | AtomDescriptors:
    """``(n_frames, D)`` mean-pooled per-atom descriptors of ``frames`` under ``model``, divided by
    ``sqrt(D)`` (:meth:`~blip_ase.models.Potential.descriptors`: invariant, MAP); with
    ``per_atom`` the atoms' own, as :class:`AtomDescriptors`.

    Args:
        model: a :class:`~blip_ase.models.Potential` with ``implements_descriptors``.
        frames: structures, evaluated in batches of about ``batch_atoms`` atoms.

    Raises:
        ValueError: a backend without descriptors.
    """
    import torch

    if not model.implements_descriptors:
        raise ValueError(
            f"FPS descriptors need the model's per-atom features; the {model.backend} backend has none: "
            "use select.strategy random"
        )
    model.eval()
    out: list[np.ndarray] = []
    chunk: list[Atoms] = []
    with torch.no_grad():
        for k, atoms in enumerate(frames):
            chunk.append(atoms)
            if k == len(frames) - 1 or sum(len(a) for a in chunk) + len(frames[k + 1]) > batch_atoms:
                per_atom_features = model.descriptors(model.build_batch(chunk)).double().cpu().numpy()
                bounds = np.cumsum([0] + [len(a) for a in chunk])
                out += [per_atom_features[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
                chunk = []
    width = out[0].shape[1] if out else 1
    if per_atom:
        features = np.concatenate(out) if out else np.zeros((0, width))
        species = np.concatenate([a.numbers for a in frames]) if frames else np.zeros(0, int)
        owner = np.repeat(np.arange(len(frames)), [len(a) for a in frames])
        return AtomDescriptors(features / np.sqrt(width), species, owner, len(frames))
    desc = np.stack([x.mean(0) for x in out]) if out else np.zeros((0, 1))
    return desc / np.sqrt(desc.shape[1])


def _atom_min_distances(pool: AtomDescriptors, other: AtomDescriptors, rows: np.ndarray | None = None) -> np.ndarray:
    """``(A,)`` distance of each atom of ``pool`` to the nearest atom of the same element among
    ``other``'s atoms (``rows``: only those); inf where there is none."""
    dmin = np.full(len(pool.species), np.inf)
    features, species = (other.features, other.species) if rows is None else (other.features[rows], other.species[rows])
    for z in np.unique(pool.species):
        mine, theirs = pool.species == z, features[species == z]
        for start in range(0, len(theirs), 1024):
            block = theirs[start:start + 1024]
            d = np.sqrt(np.maximum(((pool.features[mine, None, :] - block[None]) ** 2).sum(-1), 0.0)).min(1)
            dmin[mine] = np.minimum(dmin[mine], d)
    return dmin


def farthest_point_sampling_atoms(
    pool: AtomDescriptors, k: int, *, weights: np.ndarray | None = None,
    reference: AtomDescriptors | None = None, min_distance: float = 0.0,
) -> list[int]:  # fmt: skip
    """:func:`farthest_point_sampling` with the atom-wise frame distance of :class:`AtomDescriptors`:
    a frame's distance to the chosen (and reference) frames is the largest, over its atoms, of the
    distance to the nearest chosen atom of the same element."""
    atom_dmin = np.full(len(pool.species), np.inf) if reference is None else _atom_min_distances(pool, reference)

    def frame_distances() -> np.ndarray:
        dmin = np.full(pool.n_frames, -np.inf)
        np.maximum.at(dmin, pool.owner, atom_dmin)
        return dmin

    def add(pick: int) -> None:
        atom_dmin[:] = np.minimum(atom_dmin, _atom_min_distances(pool, pool, rows=pool.owner == pick))

    return _greedy(pool.n_frames, k, weights, min_distance, frame_distances, add)


def _greedy(n: int, k: int, weights, min_distance: float, distances, add) -> list[int]:
    """The loop of weighted FPS: ``distances()`` gives each candidate's distance to what is
    chosen (inf: nothing yet), ``add(pick)`` records a pick."""
    w = np.ones(n) if weights is None else np.asarray(weights, float)
    chosen: list[int] = []
    while len(chosen) < min(k, n):
        dmin = distances()
        eligible = dmin > min_distance
        eligible[chosen] = False
        if not eligible.any():
            break
        score = np.where(eligible, np.where(np.isinf(dmin), 1.0, dmin) * w, -np.inf)
        pick = int(np.argmax(score))
        chosen.append(pick)
        add(pick)
    return chosen


def _distances(desc: np.ndarray, point: np.ndarray) -> np.ndarray:
    return np.linalg.norm(desc - point, axis=1)


def _min_distances(desc: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    dmin = np.full(len(desc), np.inf)
    for point in [] if reference is None else reference:
        dmin = np.minimum(dmin, _distances(desc, point))
    return dmin


def farthest_point_sampling(
    desc: np.ndarray,
    k: int,
    *,
    weights: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    min_distance: float = 0.0,
) -> list[int]:
    """Greedy (weighted) farthest-point sampling.

    Args:
        desc: ``(n, d)`` descriptors.
        k: at most this many picks.
        weights: ``(n,)`` non-negative; the score of a candidate is its distance to the chosen
            set times its weight (None: all 1). The first pick (nothing chosen, no reference) is
            the largest weight (ties: the lowest index).
        reference: ``(m, d)`` descriptors already chosen earlier (labelled data).
        min_distance: candidates within this distance of a chosen or reference point are dropped.

    Returns:
        Indices in the order picked; fewer than ``k`` when the rest are near-duplicates.
    """
    dmin = _min_distances(desc, reference)

    def add(pick: int) -> None:
        dmin[:] = np.minimum(dmin, _distances(desc, desc[pick]))

    return _greedy(len(desc), k, weights, min_distance, lambda: dmin, add)


def by_uncertainty(
    desc: np.ndarray, uncertainty: np.ndarray, k: int, *, reference: np.ndarray | None = None,
    min_distance: float = 0.0,
) -> list[int]:  # fmt: skip
    """Highest ``uncertainty (n,)`` first, skipping near-duplicates (arguments as :func:`farthest_point_sampling`)."""
    dmin = _min_distances(desc, reference)
    chosen: list[int] = []
    for i in np.argsort(-np.asarray(uncertainty, float), kind="stable"):
        if len(chosen) == k:
            break
        if dmin[i] > min_distance:
            chosen.append(int(i))
            dmin = np.minimum(dmin, _distances(desc, desc[i]))
    return chosen


def select(
    desc: np.ndarray | AtomDescriptors, uncertainty: np.ndarray, config: SelectConfig, *, k: int | None = None,
    reference: np.ndarray | AtomDescriptors | None = None, round_index: int = 0,
) -> list[int]:  # fmt: skip
    """Indices of the frames to label under ``config`` (at most ``k``, default ``config.budget``).

    Args:
        desc: ``(n, d)`` descriptors of the flagged pool (:class:`AtomDescriptors` with
            ``descriptor: atoms``); uncertainty: ``(n,)`` (max force std, eV/A; a NaN or inf, from
            a non-finite prediction, counts as the largest finite value).
        reference: descriptors of the frames labelled before (of the same kind).
        round_index: mixed into the ``random`` strategy's seed.
    """
    k = config.budget if k is None else k
    uncertainty = np.asarray(uncertainty, float)
    finite = uncertainty[np.isfinite(uncertainty)]  # a non-finite prediction ranks with the most uncertain
    uncertainty = np.where(np.isfinite(uncertainty), uncertainty, finite.max() if finite.size else 1.0)
    if config.strategy == "random":
        rng = np.random.default_rng([config.seed, round_index])
        return [int(i) for i in rng.choice(len(desc), size=min(k, len(desc)), replace=False)]
    if config.strategy == "max_variance":
        return by_uncertainty(desc, uncertainty, k, reference=reference, min_distance=config.min_distance)
    top = uncertainty.max() if len(uncertainty) else 1.0
    weights = uncertainty / top if top > 0 else np.ones_like(uncertainty)
    if isinstance(desc, AtomDescriptors):
        return farthest_point_sampling_atoms(desc, k, weights=weights, reference=reference,
                                             min_distance=config.min_distance)  # fmt: skip
    return farthest_point_sampling(desc, k, weights=weights, reference=reference, min_distance=config.min_distance)
