"""Which flagged frames to label: uncertainty first, with diversity.

The descriptor of a structure is the model's mean-pooled invariant node features (PaiNN: the
scalar features entering the readout, in MAP mode), divided by ``sqrt(n_features)`` so that
distances are RMS differences per feature whatever the model's width. Strategies:

- ``fps``: uncertainty-weighted farthest-point sampling: the most uncertain frame first, then
  repeatedly the frame maximising ``distance to the chosen (and already labelled) frames x
  uncertainty / max uncertainty``;
- ``max_variance``: highest uncertainty first;
- ``random``: uniform without replacement (a baseline; no duplicate filter).

``fps`` and ``max_variance`` drop near-duplicates: frames closer than ``min_distance`` to a
chosen or an already labelled frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms

from blip_ase.active.config import SelectConfig


def descriptors(model, frames: Sequence[Atoms]) -> np.ndarray:
    """``(n_frames, n_features)`` mean-pooled node features of ``frames`` under ``model`` (MAP).

    Raises:
        ValueError: a backend without readable node features (only PaiNN has them here).
    """
    import torch

    readout = getattr(getattr(model, "net", None), "readout", None)
    if readout is None:
        raise ValueError(
            f"FPS descriptors need PaiNN node features; the {model.backend} backend has none here: "
            "use select.strategy random (max_variance also filters near-duplicates by descriptor)"
        )
    model.eval()
    captured: list[torch.Tensor] = []
    with torch.no_grad():
        model.lone_atom_output()  # cached from here on, so the hook sees only the structure's pass
        handle = readout.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            out = []
            for atoms in frames:
                captured.clear()
                model(model.build_graph(atoms), compute_forces=False)
                out.append(captured[-1].mean(0).double().cpu().numpy())
        finally:
            handle.remove()
    desc = np.stack(out) if out else np.zeros((0, 1))
    return desc / np.sqrt(desc.shape[1])


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
    n = len(desc)
    w = np.ones(n) if weights is None else np.asarray(weights, float)
    dmin = _min_distances(desc, reference)
    chosen: list[int] = []
    while len(chosen) < min(k, n):
        eligible = dmin > min_distance
        eligible[chosen] = False
        if not eligible.any():
            break
        score = np.where(eligible, np.where(np.isinf(dmin), 1.0, dmin) * w, -np.inf)
        pick = int(np.argmax(score))
        chosen.append(pick)
        dmin = np.minimum(dmin, _distances(desc, desc[pick]))
    return chosen


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
    desc: np.ndarray, uncertainty: np.ndarray, config: SelectConfig, *, k: int | None = None,
    reference: np.ndarray | None = None, round_index: int = 0,
) -> list[int]:  # fmt: skip
    """Indices of the frames to label under ``config`` (at most ``k``, default ``config.budget``).

    Args:
        desc: ``(n, d)`` descriptors of the flagged pool; uncertainty: ``(n,)`` (max force std, eV/A;
            a NaN or inf, from a non-finite prediction, counts as the largest finite value).
        reference: descriptors of the frames labelled before.
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
    return farthest_point_sampling(desc, k, weights=weights, reference=reference, min_distance=config.min_distance)
