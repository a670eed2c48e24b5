"""Warnings and errors shared by the whole package."""


class NumericalWarning(RuntimeWarning):
    """An iterative method stopped short of its tolerance (the result is still returned)."""


class BreakdownError(ArithmeticError):
    """An iterative method met a non-positive curvature pᵀAp ≤ 0 or a NaN: A is not SPD."""
