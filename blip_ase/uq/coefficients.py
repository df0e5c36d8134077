"""The inference network's noise coefficients on a data set: is the adaptive part adaptive?

BLIP's promise is that alpha (per edge) and beta (per node) are small where the model has seen
data and large away from it. These functions collect them per Bayesian layer for a set of
structures, so ``blip eval`` can report and plot them for the ID and OOD sets side by side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def collect_coefficients(model: Any, frames: list) -> dict[str, np.ndarray] | None:
    """Alpha and beta of every edge and node of ``frames``, one column per Bayesian layer.

    Returns:
        ``{"edge": (sum E, n_edge_layers), "node": (sum N, n_node_layers)}``, or None for a model
        without an inference network (deterministic, MC dropout, ensemble).
    """
    if getattr(model, "posterior", None) is None:
        return None
    edges, nodes = [], []
    with torch.no_grad():
        for atoms in frames:
            x = model.posterior_inputs(model.build_graph(atoms))
            c = model.posterior(x.species, x.edge_index, x.edge_vector)
            edges.append(c.edge.double().cpu().numpy())
            nodes.append(c.node.double().cpu().numpy())
    return {"edge": np.concatenate(edges), "node": np.concatenate(nodes)}


def summarise_coefficients(values: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """Per layer: mean and the 10th, 50th and 90th percentiles of alpha (``edge``) and beta
    (``node``); plain lists of floats, for ``metrics.json``."""
    out = {}
    for kind, block in values.items():
        if block.shape[0] == 0 or block.shape[1] == 0:
            out[kind] = {"mean": [], "p10": [], "p50": [], "p90": []}
            continue
        out[kind] = {"mean": block.mean(axis=0).tolist(),
                     **{f"p{q}": np.percentile(block, q, axis=0).tolist() for q in (10, 50, 90)}}
    return out
