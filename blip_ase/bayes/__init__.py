"""The BLIP method, independent of any architecture: Bayesian linears, inference network, KL."""

from blip_ase.bayes.config import BayesConfig
from blip_ase.bayes.dropout import DropoutLinear, dropoutize, no_coefficients
from blip_ase.bayes.kl import kl_divergence, kl_per_coefficient
from blip_ase.bayes.linear import BayesianLinear, NoiseSource, StructureNoise, input_gradients_only, structure_sizes
from blip_ase.bayes.posterior import Coefficients, InferenceNetwork, PosteriorInputs, edge_jacobian
from blip_ase.bayes.wrap import bayesian_layers, bayesianize, noise_context

__all__ = [
    "BayesConfig",
    "BayesianLinear",
    "Coefficients",
    "DropoutLinear",
    "InferenceNetwork",
    "NoiseSource",
    "StructureNoise",
    "structure_sizes",
    "PosteriorInputs",
    "bayesian_layers",
    "bayesianize",
    "dropoutize",
    "edge_jacobian",
    "input_gradients_only",
    "kl_divergence",
    "kl_per_coefficient",
    "no_coefficients",
    "noise_context",
]
