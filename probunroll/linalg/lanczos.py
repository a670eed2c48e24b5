"""Lanczos tridiagonals from CG coefficients and stochastic Lanczos quadrature (SLQ).

Preconditioned CG on ``A x = b`` with preconditioner ``M`` is the Lanczos process on
``Ã = M^{-1/2} A M^{-1/2}`` started at ``q₁ = M^{-1/2} b / ‖M^{-1/2} b‖`` (Saad, *Iterative
Methods for Sparse Linear Systems*, §6.7.3). With CG step sizes ``a_j`` and direction ratios
``b_j`` the Lanczos tridiagonal ``T_U`` is

    T_11 = 1/a_1,   T_jj = 1/a_j + b_{j-1}/a_{j-1},   T_{j,j+1} = T_{j+1,j} = √b_j / a_j.

Gauss quadrature then gives, with ``T_U = V Λ Vᵀ`` and ``z = M^{-1/2} b``,

    zᵀ f(Ã) z ≈ ‖z‖² Σ_j V_{1j}² f(λ_j),

and stochastic Lanczos quadrature (Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl. 38(4), 2017)
averages it over random probes ``z`` with E[zzᵀ] = I to estimate
``log det A = tr log Ã + log det M``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from probunroll.linalg.cg import LanczosCoefficients

__all__ = ["lanczos_quadrature", "lanczos_tridiagonal"]


def lanczos_tridiagonal(coeffs: LanczosCoefficients) -> Tensor:
    """Build the Lanczos tridiagonal of every system from its CG coefficients.

    Parameters
    ----------
    coeffs : LanczosCoefficients
        From ``cg(..., lanczos=True).lanczos``.

    Returns
    -------
    Tensor, shape (..., U, U)
        ``T`` per system. Past a system's length ``L`` the matrix is padded with the identity
        (decoupled from the leading ``L×L`` block), so padding has zero weight in the
        first-component quadrature and ``log 1 = 0``.
    """
    a, b, lengths = coeffs.alphas, coeffs.betas, coeffs.lengths
    U = a.shape[-1]
    idx = torch.arange(U, device=a.device)
    valid = idx < lengths.unsqueeze(-1)  # (..., U)
    one = torch.ones((), dtype=a.dtype, device=a.device)
    inv_a = torch.where(valid, 1 / torch.where(valid, a, one), one)
    prev = torch.where(valid, b / torch.where(valid, a, one), torch.zeros_like(a))
    shifted = torch.where(valid[..., 1:], prev[..., :-1], torch.zeros_like(prev[..., :-1]))
    diag = torch.cat([inv_a[..., :1], inv_a[..., 1:] + shifted], dim=-1)
    off_valid = valid[..., 1:]  # entry (j, j+1) exists when j+1 < L
    off = torch.where(
        off_valid,
        torch.sqrt(torch.clamp(b[..., :-1], min=0))
        / torch.where(valid[..., :-1], a[..., :-1], one),
        torch.zeros_like(a[..., :-1]),
    )
    return torch.diag_embed(diag) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


def lanczos_quadrature(coeffs: LanczosCoefficients, fn=torch.log) -> Tensor:
    """Gauss quadrature ``zᵀ f(Ã) z ≈ ‖z‖² Σ_j V_{1j}² f(λ_j)`` for every system.

    Parameters
    ----------
    coeffs : LanczosCoefficients
        From ``cg(..., lanczos=True)``; ``start_norm_sq`` is ``‖z‖² = bᵀM⁻¹b``.
    fn : callable
        Spectral function (default ``torch.log``).

    Returns
    -------
    Tensor, shape (...)
        The quadrature value per system (0 for systems that took no step).
    """
    T = lanczos_tridiagonal(coeffs)
    if T.shape[-1] == 0:
        return torch.zeros_like(coeffs.start_norm_sq)
    evals, evecs = torch.linalg.eigh(T)
    weights = evecs[..., 0, :] ** 2
    tiny = torch.finfo(evals.dtype).tiny
    values = fn(torch.clamp(evals, min=tiny))
    return coeffs.start_norm_sq * (weights * values).sum(-1)
