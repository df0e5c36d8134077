"""Configuration of the BLIP method for one model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class BayesConfig:
    """Bayesian layers, inference network and prior.

    Attributes:
        p0: prior dropout probability; prior variance ``p0/(1-p0) * theta^2``.
        kl_weight: lambda, weight of the KL term in the loss.
        p_min, p_max: clamp of the predicted dropout probability.
        p_init: dropout probability the inference network starts from.
        hidden: width of the inference network's hidden layers.
        n_hidden: number of hidden (swish) layers of each head.
        n_rbf: Gaussian radial basis functions of the edge length fed to the edge head.
        unit_vector: also feed the unit edge vector to the edge head (non-equivariant models).
        neighbourhood: the node head also sees a radial sum over the atom's neighbours, so beta
            depends on the geometry (and the noise-contrastive prior can act on it), not only on
            the element.
        environment: radial channels K of the environment features the edge head also sees
            (both atoms' two- and three-body invariants, ``InferenceNetwork.environment_features``);
            0 = alpha from the edge's length and elements only.
        edge_pattern, node_pattern: regexes (``re.fullmatch`` on module names) of the
            message (alpha per edge) and update (beta per node) linears; None = backend default.
        method: ``blip`` (variational adaptive dropout: the inference network, prior and KL
            above) or ``mc_dropout`` (baseline: fixed-rate Bernoulli dropout on the inputs of the
            same linears, trained with one mask per step and no KL; only ``dropout_p`` and the
            patterns apply).
        dropout_p: drop probability of ``mc_dropout``.
    """

    p0: float = 0.5
    kl_weight: float = 10.0
    p_min: float = 0.0
    p_max: float = 0.8
    p_init: float = 0.01
    hidden: int = 64
    n_hidden: int = 2
    n_rbf: int = 20
    unit_vector: bool = False
    neighbourhood: bool = False
    environment: int = 0
    edge_pattern: str | None = None
    node_pattern: str | None = None
    method: Literal["blip", "mc_dropout"] = "blip"
    dropout_p: float = 0.1
