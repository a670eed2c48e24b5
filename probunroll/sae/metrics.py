r"""Evaluation metrics for sparse autoencoders.

Conventions (``reference/sae.md`` §E): explained variance centres each feature on its own
mean (not one scalar mean), L0 counts z ≠ 0 (MP codes can be negative), and dictionaries
are compared by Hungarian matching of atoms on cosine similarity.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["coherence", "dead_fraction", "explained_variance", "l0", "mcc", "stability"]


def _check_pair(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise ValueError(f"{na} and {nb} must be tensors")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{na} and {nb} must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")


@torch.no_grad()
def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    r"""Variance-weighted R²: :math:`1 - \sum\lVert x - \hat x\rVert^2 /
    \sum\lVert x - \bar x\rVert^2`, x̄ the per-feature mean; equals scikit-learn's
    ``r2_score(x, x_hat, multioutput="variance_weighted")``.

    Parameters
    ----------
    x, x_hat : Tensor
        (N, d) data and reconstructions.
    """
    _check_pair(x, x_hat, "x", "x_hat")
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
    sse = ((x - x_hat) ** 2).sum()
    sst = ((x - x.mean(0)) ** 2).sum()
    return 1 - sse / sst


@torch.no_grad()
def l0(codes: Tensor) -> Tensor:
    """Mean number of non-zero entries per code (z ≠ 0, so negative codes count)."""
    if not isinstance(codes, Tensor) or codes.dim() != 2:
        raise ValueError("codes must be a 2-D tensor (N, c)")
    return (codes != 0).sum(-1).to(torch.float64).mean()


@torch.no_grad()
def dead_fraction(codes: Tensor) -> Tensor:
    """Fraction of latents that are zero on every row of ``codes`` (N, c)."""
    if not isinstance(codes, Tensor) or codes.dim() != 2:
        raise ValueError("codes must be a 2-D tensor (N, c)")
    return (~(codes != 0).any(0)).to(torch.float64).mean()


def _cosines(A: Tensor, B: Tensor) -> np.ndarray:
    A = A.detach().double()
    B = B.detach().double()
    A = A / A.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    B = B / B.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return (A @ B.T).cpu().numpy()


def stability(D1: Tensor, D2: Tensor, absolute: bool = False) -> float:
    """Mean cosine of atoms matched one-to-one by the Hungarian algorithm (1 = the same
    dictionary up to permutation). ``absolute`` matches on |cos| (PW-MCC style).

    Parameters
    ----------
    D1, D2 : Tensor
        (c1, d) and (c2, d) dictionaries; min(c1, c2) pairs are matched.
    absolute : bool, default False
        Score |cos| instead of cos (sign-invariant).
    """
    _check_pair(D1, D2, "D1", "D2")
    if D1.shape[1] != D2.shape[1]:
        raise ValueError(
            f"D1 and D2 have atoms of different dimensions {D1.shape[1]} and {D2.shape[1]}"
        )
    cos = _cosines(D1, D2)
    if absolute:
        cos = np.abs(cos)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return float(cos[rows, cols].mean())


def mcc(learned: Tensor, true: Tensor) -> float:
    """Mean correlation coefficient of dictionary recovery: every ground-truth feature is
    matched to a distinct learned atom (Hungarian on |cos|) and the |cos| are averaged over
    the ground-truth features; invariant to sign flips and permutations.

    Parameters
    ----------
    learned : Tensor
        (c, d) learned atoms, c ≥ number of true features.
    true : Tensor
        (n, d) ground-truth feature directions.
    """
    _check_pair(learned, true, "learned", "true")
    if learned.shape[1] != true.shape[1]:
        raise ValueError("learned and true atoms have different dimensions")
    if learned.shape[0] < true.shape[0]:
        raise ValueError(
            f"learned has {learned.shape[0]} atoms, fewer than the {true.shape[0]} true features"
        )
    cos = np.abs(_cosines(true, learned))
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return float(cos[rows, cols].mean())


def coherence(D: Tensor, reduce: str = "max") -> float:
    """Mutual coherence of a dictionary: per atom the largest |cos| to another atom, then the
    max (``reduce="max"``, the classical μ) or the mean (``"mean"``) over atoms."""
    if not isinstance(D, Tensor) or D.dim() != 2 or D.shape[0] < 2:
        raise ValueError("D must be a 2-D tensor with at least two atoms")
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    cos = np.abs(_cosines(D, D))
    np.fill_diagonal(cos, 0.0)
    per_atom = cos.max(1)
    return float(per_atom.max() if reduce == "max" else per_atom.mean())
