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
from probunroll.linalg.prox import (
    fista,
    hard_threshold,
    ista,
    ista_step,
    project_l2_ball,
    project_simplex,
    soft_threshold,
    sparsemax,
)
from probunroll.linalg.pursuit import (
    PursuitResult,
    Selection,
    gram_matrix,
    matching_pursuit,
    mp_reevaluate,
    mp_select,
    orthogonal_matching_pursuit,
)

__all__ = [
    "CGResult",
    "LanczosCoefficients",
    "ProbeSolveResult",
    "PursuitResult",
    "Selection",
    "cg",
    "diag_inverse",
    "fista",
    "gaussian_perturbation",
    "gram_matrix",
    "hard_threshold",
    "ista",
    "ista_step",
    "lanczos_quadrature",
    "lanczos_tridiagonal",
    "matching_pursuit",
    "mp_reevaluate",
    "mp_select",
    "orthogonal_matching_pursuit",
    "perturb_and_solve",
    "probe_solve",
    "project_l2_ball",
    "project_simplex",
    "rademacher",
    "slq_logdet",
    "soft_threshold",
    "sparsemax",
]
