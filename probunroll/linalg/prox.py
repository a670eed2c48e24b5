"""Proximal operators and proximal-gradient loops (ISTA / FISTA).

This branch (``seeds``) carries only the pieces the seed systems need: minimal
``soft_threshold`` / ``project_simplex`` (the ``sae`` branch owns the full versions; the
lead keeps one copy of each when merging) and the ISTA / FISTA section below.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "fista",
    "ista",
    "ista_step",
    "project_l2_ball",
    "project_simplex",
    "soft_threshold",
]


def soft_threshold(x: Tensor, threshold: Tensor | float) -> Tensor:
    r"""Soft threshold :math:`\operatorname{sign}(x)\max(|x| - \tau, 0)`, the prox of
    :math:`\tau\|\cdot\|_1`. ``threshold`` broadcasts against ``x`` (a tensor gives a weighted
    ℓ1 prox)."""
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0)


def project_simplex(v: Tensor, dim: int = -1) -> Tensor:
    r"""Euclidean projection onto the probability simplex along ``dim`` (= sparsemax).

    Sort-based algorithm of Held et al. (1974) / Duchi et al. (2008):
    :math:`\Pi(v) = \max(v - \tau, 0)` with :math:`\tau` chosen so the result sums to one.
    """
    v = v.movedim(dim, -1)
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (u - css / idx) > 0
    rho = support.sum(-1, keepdim=True)
    tau = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return torch.clamp(v - tau, min=0).movedim(-1, dim)


# --- ISTA / FISTA ---
# Generic proximal-gradient steps for the unrolled encoders of ``probunroll.coding``.
# A ``prox`` is a callable ``prox(v, step) -> Tensor`` returning
# argmin_u  g(u) + ‖u − v‖² / (2·step); a ``grad`` is a callable ``grad(z) -> ∇f(z)``.
# Every loop is plain torch, so autograd differentiates through it ("unrolling").

Prox = Callable[[Tensor, Tensor | float], Tensor]


def project_l2_ball(x: Tensor, radius: float = 1.0, dim: int = -1) -> Tensor:
    """Project each slice of ``x`` along ``dim`` onto the ℓ2 ball of ``radius``."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return x * torch.clamp(radius / torch.clamp(norm, min=torch.finfo(x.dtype).tiny), max=1)


def ista_step(z: Tensor, grad: Tensor, step: Tensor | float, prox: Prox) -> Tensor:
    r"""One proximal-gradient step :math:`z^+ = \operatorname{prox}_{s g}(z - s\nabla f(z))`."""
    return prox(z - step * grad, step)


def ista(
    grad: Callable[[Tensor], Tensor],
    prox: Prox,
    z0: Tensor,
    step: Tensor | float,
    n_iter: int,
) -> Tensor:
    """ISTA (Daubechies, Defrise & De Mol 2004): ``n_iter`` proximal-gradient steps from
    ``z0`` with a fixed step (converges for ``step ≤ 1/L``, L the Lipschitz constant of ∇f)."""
    z = z0
    for _ in range(n_iter):
        z = ista_step(z, grad(z), step, prox)
    return z


def fista(
    grad: Callable[[Tensor], Tensor],
    prox: Prox,
    z0: Tensor,
    step: Tensor | float,
    n_iter: int,
    momentum: str = "beck",
) -> Tensor:
    r"""FISTA (Beck & Teboulle 2009): proximal gradient with Nesterov momentum.

    .. math::
        z_{t+1} = \operatorname{prox}_{s g}(y_t - s\nabla f(y_t)),\qquad
        y_{t+1} = z_{t+1} + \beta_t (z_{t+1} - z_t)

    Parameters
    ----------
    grad, prox
        Gradient of the smooth part and prox of the non-smooth part (see module notes).
    z0
        Starting point.
    step
        Step size s ≤ 1/L; a tensor may carry gradients (learnable step).
    n_iter
        Number of (unrolled) iterations.
    momentum
        ``"beck"``: :math:`\beta_t = (\tau_t - 1)/\tau_{t+1}` with
        :math:`\tau_{t+1} = (1 + \sqrt{1 + 4\tau_t^2})/2`; ``"t+3"``: :math:`\beta_t = t/(t+3)`
        (Chambolle & Dossal 2015, the form used by K-Deep Simplex).
    """
    if momentum not in ("beck", "t+3"):
        raise ValueError(f"momentum must be 'beck' or 't+3', got {momentum!r}")
    z_prev = z0
    y = z0
    tau = 1.0
    for t in range(n_iter):
        z = ista_step(y, grad(y), step, prox)
        if momentum == "beck":
            tau_next = (1 + (1 + 4 * tau * tau) ** 0.5) / 2
            beta = (tau - 1) / tau_next
            tau = tau_next
        else:
            beta = t / (t + 3)
        y = z + beta * (z - z_prev)
        z_prev = z
    return z_prev
