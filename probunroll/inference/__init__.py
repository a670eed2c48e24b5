"""Fitting strategies that work on any latent Gaussian model through the model interface:
exact EM (the baseline), covariance-free EM, gradient EM and probabilistic unrolling."""

from probunroll.inference.cofem import cofem_estep, cofem_posterior, rademacher_probes
from probunroll.inference.em import em_estep, exact_posterior, observed_rows
from probunroll.inference.gradient_em import (
    DensePosterior,
    dense_posterior,
    fisher_objective,
    fit_gradient_em,
)
from probunroll.inference.loop import run_em
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
    "cofem_estep",
    "cofem_posterior",
    "dense_posterior",
    "em_estep",
    "exact_posterior",
    "fisher_objective",
    "fit_gradient_em",
    "fit_stochastic",
    "fit_unrolled",
    "make_optimizer",
    "network_gradient_surrogate",
    "observed_rows",
    "output_gradient_surrogate",
    "rademacher_probes",
    "run_em",
    "unrolled_objective",
    "unrolled_solve",
]
