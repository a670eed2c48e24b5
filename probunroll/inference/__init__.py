"""Fitting strategies that work on any latent Gaussian model through the model interface."""

from probunroll.inference.gradient_em import (
    DensePosterior,
    dense_posterior,
    fisher_objective,
    fit_gradient_em,
)
from probunroll.inference.stochastic import fit_stochastic, make_optimizer
from probunroll.inference.unrolled import (
    UnrolledConfig,
    UnrolledSolve,
    fit_unrolled,
    network_gradient_surrogate,
    output_gradient_surrogate,
    unrolled_objective,
    unrolled_solve,
)

__all__ = [
    "DensePosterior",
    "UnrolledConfig",
    "UnrolledSolve",
    "dense_posterior",
    "fisher_objective",
    "fit_gradient_em",
    "fit_stochastic",
    "fit_unrolled",
    "make_optimizer",
    "network_gradient_surrogate",
    "output_gradient_surrogate",
    "unrolled_objective",
    "unrolled_solve",
]
