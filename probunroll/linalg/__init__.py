"""The solver core: batched differentiable CG, Lanczos log-determinants, probe estimators,
matching pursuit and proximal tools. Knows nothing of the models built on it."""

from probunroll.linalg.cg import CGResult, LanczosCoefficients, cg
from probunroll.linalg.lanczos import lanczos_quadrature, lanczos_tridiagonal
from probunroll.linalg.probes import (
    ProbeSolveResult,
    diag_inverse,
    gaussian_perturbation,
    perturb_and_solve,
    probe_solve,
    rademacher,
    slq_logdet,
)

__all__ = [
    "CGResult",
    "LanczosCoefficients",
    "ProbeSolveResult",
    "cg",
    "diag_inverse",
    "gaussian_perturbation",
    "lanczos_quadrature",
    "lanczos_tridiagonal",
    "perturb_and_solve",
    "probe_solve",
    "rademacher",
    "slq_logdet",
]
