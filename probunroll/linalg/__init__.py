"""The solver core: batched differentiable CG, Lanczos log-determinants, probe estimators,
matching pursuit and proximal tools. Knows nothing of the models built on it."""

from probunroll.linalg.prox import hard_threshold, project_simplex, soft_threshold, sparsemax
from probunroll.linalg.pursuit import (
    PursuitResult,
    Selection,
    matching_pursuit,
    mp_reevaluate,
    mp_select,
    orthogonal_matching_pursuit,
)

__all__ = [
    "PursuitResult",
    "Selection",
    "hard_threshold",
    "matching_pursuit",
    "mp_reevaluate",
    "mp_select",
    "orthogonal_matching_pursuit",
    "project_simplex",
    "soft_threshold",
    "sparsemax",
]
