"""CUDA-graph capture awareness for code that otherwise checks its inputs on the host.

A host check (``bool(t.all())``, ``float(t)``, ``torch.linalg.cholesky``'s error check)
synchronises the device, which is forbidden while a CUDA graph is being captured. Functions on
the captured path (CG, the perturbation draws, the models' exact posteriors) ask
:func:`capturing` and skip such checks then; the caller checks the outputs after replay
(:func:`probunroll.inference.stochastic.fit_stochastic` with ``cuda_graph=True`` checks every
epoch's objective is finite).

Reference: PyTorch, "CUDA Graphs" (torch.cuda.graph, whole-network capture).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "capturing",
    "cholesky",
    "cholesky_inverse",
    "cholesky_solve",
    "spd_inverse",
    "triangular_cholesky_inverse",
    "triangular_cholesky_solve",
]


def capturing(t: Tensor) -> bool:
    """Whether ``t`` lives on a CUDA device whose current stream is capturing a graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def cholesky(A: Tensor) -> Tensor:
    """``torch.linalg.cholesky``, or ``cholesky_ex`` (no error check, no sync) while capturing:
    a failed factor then shows up as NaN downstream instead of a ``LinAlgError``."""
    if capturing(A):
        return torch.linalg.cholesky_ex(A).L
    return torch.linalg.cholesky(A)


def cholesky_solve(B: Tensor, L: Tensor) -> Tensor:
    """``(LLᵀ)⁻¹ B`` (``torch.cholesky_solve``); while capturing, two triangular solves
    instead, since the batched MAGMA ``potrs`` behind ``cholesky_solve`` allocates device
    memory, which a capture forbids."""
    return triangular_cholesky_solve(B, L) if capturing(L) else torch.cholesky_solve(B, L)


def cholesky_inverse(L: Tensor) -> Tensor:
    """``(LLᵀ)⁻¹`` (``torch.cholesky_inverse``); while capturing, ``L⁻ᵀL⁻¹`` from one
    triangular solve (see :func:`cholesky_solve`)."""
    return triangular_cholesky_inverse(L) if capturing(L) else torch.cholesky_inverse(L)


def triangular_cholesky_solve(B: Tensor, L: Tensor) -> Tensor:
    """``L⁻ᵀ(L⁻¹B)`` by two triangular solves; shapes (..., n, k) and (..., n, n)."""
    y = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True)


def triangular_cholesky_inverse(L: Tensor) -> Tensor:
    """``L⁻ᵀL⁻¹`` from one triangular solve against the identity; shape (..., n, n)."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    inv = torch.linalg.solve_triangular(L, eye, upper=False)
    return inv.mT @ inv


def spd_inverse(P: Tensor, dtype: torch.dtype) -> Tensor:
    """``P⁻¹`` of an SPD matrix by Cholesky (:func:`cholesky`, :func:`cholesky_inverse`),
    symmetrised exactly and cast to ``dtype``: an SPD ``M⁻¹`` for a preconditioner that is
    factored in a wider dtype than it is applied in. Shape (..., n, n)."""
    inv = cholesky_inverse(cholesky(P))
    return (0.5 * (inv + inv.mT)).to(dtype)
