"""Moments of the normal density truncated to ``[0, ∞)``, for non-negative SBL.

For :math:`z \\sim \\mathcal N(\\mu, s)` restricted to :math:`z \\ge 0`, with
:math:`a = \\mu/\\sqrt s` and the inverse Mills ratio :math:`\\lambda = \\varphi(a)/\\Phi(a)`,

.. math::

    \\mathbb E[z] = \\sqrt s\\,(a + \\lambda),\\qquad
    \\mathbb E[z^2] = \\mu^2 + s + \\mu\\sqrt s\\,\\lambda = s\\,(1 + a^2 + a\\lambda),\\qquad
    \\operatorname{Var}[z] = s\\,(1 - \\lambda(a + \\lambda)).

The research code (sblearn) writes the correction as :math:`\\mu\\sqrt{s/\\pi}\\,e^{-\\mu^2/2s} /
\\operatorname{erfc}(-\\mu/\\sqrt{2s})`, which is short of a factor :math:`\\sqrt2`
(``shared/reference/unrolling.md`` §E.12). Far in the left tail (:math:`a \\to -\\infty`) the
expressions above cancel catastrophically, so there the asymptotic series of the Mills ratio
:math:`R(h) = h + 1/h - 2/h^3 + 10/h^5 - 74/h^7 + 706/h^9 - \\dots` (``h = -a``) is used instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# ``-a`` beyond which the series (relative error ≲ 1e-9 there) beats the closed form (which
# loses about ``eps · a⁴`` relative accuracy); both are evaluated in float64.
_TAIL = 20.0


def truncated_normal_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``N(mean, var)`` truncated to ``[0, ∞)``, elementwise.

    Parameters
    ----------
    mean, var : Tensor
        Location and (positive) variance of the untruncated normal; broadcastable.

    Returns
    -------
    tmean, tvar : Tensor
        ``E[z]`` and ``Var[z]`` of the truncated density, in the dtype of ``mean``.
        Computed in float64 (the closed form loses accuracy fast in float32 for ``a < -4``).
    """
    dtype = torch.promote_types(mean.dtype, var.dtype)
    var = var.to(torch.float64)
    sd = var.sqrt()
    a = mean.to(torch.float64) / sd
    # Closed form, guarded so that the unused branch stays finite.
    a_c = a.clamp_min(-_TAIL)
    lam = torch.exp(-0.5 * a_c * a_c - _LOG_SQRT_2PI - torch.special.log_ndtr(a_c))
    shift_c = a_c + lam
    var_c = 1.0 - lam * shift_c
    # Left-tail series in u = 1/h², h = -a.
    h = (-a).clamp_min(1.0)
    u = 1.0 / (h * h)
    shift_t = (1.0 - u * (2.0 - u * (10.0 - u * (74.0 - 706.0 * u)))) / h
    var_t = u * (1.0 - u * (6.0 - u * (50.0 - u * (518.0 - 6354.0 * u))))
    tail = a < -_TAIL
    shift = torch.where(tail, shift_t, shift_c)
    scaled_var = torch.where(tail, var_t, var_c)
    return (sd * shift).to(dtype), (var * scaled_var).to(dtype)


def truncated_normal_second_moment(mean: Tensor, var: Tensor) -> Tensor:
    """``E[z²] = μ² + s + μ√s λ`` of ``N(mean, var)`` truncated to ``[0, ∞)``."""
    tmean, tvar = truncated_normal_moments(mean, var)
    return tmean * tmean + tvar


def pyro_truncated_normal(loc: Tensor, scale: Tensor) -> Any:
    """A pyro distribution: ``Normal(loc, scale)`` truncated to ``[0, ∞)`` (pyro imported lazily).

    ``log_prob(x) = log N(x; loc, scale²) − log Φ(loc/scale)`` for ``x ≥ 0``, ``-inf`` below;
    sampling by the inverse CDF.
    """
    import pyro.distributions as dist
    from torch.distributions import constraints

    class TruncatedNormal(dist.TorchDistribution):
        arg_constraints = {"loc": constraints.real, "scale": constraints.positive}  # noqa: RUF012
        support = constraints.nonnegative
        has_rsample = True

        def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = None):
            self.loc, self.scale = torch.broadcast_tensors(loc, scale)
            super().__init__(self.loc.shape, validate_args=validate_args)

        def log_prob(self, value: Tensor) -> Tensor:
            z = (value - self.loc) / self.scale
            lp = -0.5 * z * z - _LOG_SQRT_2PI - torch.log(self.scale)
            lp = lp - torch.special.log_ndtr(self.loc / self.scale)
            return torch.where(value >= 0, lp, torch.full_like(lp, -math.inf))

        def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:  # noqa: B008
            shape = self._extended_shape(sample_shape)
            low = torch.special.ndtr(-self.loc / self.scale)
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
            u = low + (1.0 - low) * u
            return (self.loc + self.scale * torch.special.ndtri(u)).clamp_min(0.0)

    return TruncatedNormal(loc, scale)
