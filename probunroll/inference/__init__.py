"""Fitting strategies that work on any latent Gaussian model through its interface:
exact EM (the baseline) and covariance-free EM."""

from probunroll.inference.cofem import cofem_estep, cofem_posterior, rademacher_probes
from probunroll.inference.em import em_estep, exact_posterior, observed_rows
from probunroll.inference.loop import run_em

__all__ = [
    "cofem_estep",
    "cofem_posterior",
    "em_estep",
    "exact_posterior",
    "observed_rows",
    "rademacher_probes",
    "run_em",
]
