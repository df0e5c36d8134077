"""Turn chosen linears of any torch model into Bayesian ones, and set their noise per pass.

Layers are chosen by a regular expression on their module name (``model.named_modules()``)
and a role: message-function layers get alpha per edge, update-function layers beta per node.
Wrapping keeps parameter objects and state_dict keys unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from blip_ase.bayes.linear import BayesianLinear, NoiseSource, Role
from blip_ase.bayes.posterior import Coefficients


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)


def bayesianize(
    model: nn.Module,
    *,
    edge_pattern: str,
    node_pattern: str,
    make: Callable[[nn.Linear, Role, int], BayesianLinear] | None = None,
) -> tuple[list[str], list[str]]:
    """Replace matching ``nn.Linear`` modules of ``model`` (in place) by :class:`BayesianLinear`.

    Args:
        model: any module; its parameters are shared, not copied.
        edge_pattern: regex (``re.fullmatch``) for message-function linears (alpha per edge).
        node_pattern: regex for update-function linears (beta per node).
        make: ``make(linear, role, column)`` builds the replacement (default
            :meth:`BayesianLinear.from_linear`; MC dropout passes its own layer).

    Returns:
        ``(edge_names, node_names)``; a layer's column in the inference network output is its
        position in these lists.

    Raises:
        ValueError: if no linear matches either pattern or a name matches both.
    """
    edge_names, node_names = [], []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, BayesianLinear):
            continue
        is_edge = re.fullmatch(edge_pattern, name) is not None
        is_node = re.fullmatch(node_pattern, name) is not None
        if is_edge and is_node:
            raise ValueError(f"linear {name!r} matches both the edge and the node pattern")
        if is_edge or is_node:
            names = edge_names if is_edge else node_names
            role: Role = "edge" if is_edge else "node"
            if make is None:
                layer = BayesianLinear.from_linear(module, role=role, column=len(names))
            else:
                layer = make(module, role, len(names))
            _replace(model, name, layer)
            names.append(name)
    if not edge_names and not node_names:
        raise ValueError(f"no nn.Linear of the model matches {edge_pattern!r} or {node_pattern!r}")
    return edge_names, node_names


def bayesian_layers(model: nn.Module) -> list[BayesianLinear]:
    """All Bayesian linears of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, BayesianLinear)]


@contextmanager
def noise_context(model: nn.Module, coefficients: Coefficients | None, noise: NoiseSource | None) -> Iterator[None]:
    """Within the block, Bayesian layers of ``model`` sample with these coefficients and noise.

    With ``coefficients`` or ``noise`` None the layers run in MAP mode (plain linears).
    ``coefficients`` must already be repeated to the number of samples in ``noise``. For a small
    structure (at most :data:`~blip_ase.bayes.linear.PREPARE_LIMIT` numbers per sample) the noise of a pass that applies
    each Bayesian layer once is drawn up front; a large one draws per layer, which bounds memory.
    The choice depends on the per-sample size only, so batched and sequential samples agree.
    """
    layers = bayesian_layers(model)
    try:
        layout = []
        for layer in layers:
            if coefficients is None or noise is None:
                layer.coefficient, layer.noise = None, None
                continue
            block = coefficients.edge if layer.role == "edge" else coefficients.node
            layer.coefficient = block[:, layer.column : layer.column + 1]
            layer.noise = noise
            layout.append((layer.role, block.shape[0] // noise.n_samples, layer.noise_columns))
        if layout:
            noise.prepare(layout, dtype=coefficients.edge.dtype)
        yield
    finally:
        for layer in layers:
            layer.coefficient, layer.noise = None, None
