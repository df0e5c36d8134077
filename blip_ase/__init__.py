"""blip-ase: Bayesian Learned Interatomic Potentials as ASE calculators."""

__version__ = "0.1.0"
