"""Proximal maps and projections: sparsemax, the Euclidean simplex projection, thresholds.

Every function works on batches: the solved dimension is ``dim`` (the last by default) and
all other dimensions are independent problems.

References
----------
.. [1] A. Martins and R. Astudillo, "From softmax to sparsemax: a sparse model of attention
   and multi-label classification", ICML 2016.
.. [2] J. Duchi, S. Shalev-Shwartz, Y. Singer and T. Chandra, "Efficient projections onto the
   l1-ball for learning in high dimensions", ICML 2008.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hard_threshold", "project_simplex", "soft_threshold", "sparsemax"]


def _check_vector(v: Tensor, dim: int, name: str = "v") -> int:
    if not isinstance(v, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
    if v.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension")
    if not -v.dim() <= dim < v.dim():
        raise ValueError(f"dim={dim} is out of range for {name} with {v.dim()} dimensions")
    if v.shape[dim] == 0:
        raise ValueError(f"{name} has size 0 along dim={dim}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return dim % v.dim()


def _simplex_threshold(v: Tensor, radius: float) -> Tensor:
    """τ such that Σ max(v − τ, 0) = radius, along the last dimension (sort-based [2])."""
    z, _ = torch.sort(v, dim=-1, descending=True)
    cumsum = z.cumsum(dim=-1) - radius
    ks = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = z * ks > cumsum  # a prefix of the sorted order
    k = support.sum(dim=-1, keepdim=True)  # >= 1 always (the largest entry qualifies)
    return cumsum.gather(-1, k - 1) / k.to(v.dtype)


class _Sparsemax(torch.autograd.Function):
    """Sparsemax on the last dimension with the exact (generalised) Jacobian in backward."""

    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:  # type: ignore[override]
        out = torch.clamp(v - _simplex_threshold(v, 1.0), min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        support = (out > 0).to(grad.dtype)
        mean = (grad * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
        return support * (grad - mean)


def sparsemax(v: Tensor, dim: int = -1) -> Tensor:
    r"""Sparsemax: the Euclidean projection of ``v`` onto the probability simplex.

    .. math:: \operatorname{sparsemax}(v) = \arg\min_{z \ge 0,\ \mathbf 1^\top z = 1}
              \lVert z - v\rVert_2^2 = \max(v - \tau(v), 0),

    with τ found by sorting: the support size is the largest k with
    :math:`1 + k v_{(k)} > \sum_{i\le k} v_{(i)}` and :math:`\tau = (\sum_{i\le k} v_{(i)} - 1)/k`.

    The backward pass is the exact Jacobian-vector product [1]_: with ``s`` the support mask,
    :math:`\partial L/\partial v = s \odot (g - \overline{g}_s)` where
    :math:`\overline{g}_s` is the mean of the incoming gradient over the support.

    Parameters
    ----------
    v : Tensor
        Scores, any shape; floating point, finite.
    dim : int, default -1
        The dimension that sums to one.

    Returns
    -------
    Tensor
        Same shape as ``v``; non-negative and summing to 1 along ``dim``.

    References
    ----------
    .. [1] A. Martins and R. Astudillo, ICML 2016.

    Examples
    --------
    >>> sparsemax(torch.tensor([2.0, 1.0, -1.0]))
    tensor([1., 0., 0.])
    """
    dim = _check_vector(v, dim)
    out = _Sparsemax.apply(v.movedim(dim, -1))
    return out.movedim(-1, dim)


def project_simplex(v: Tensor, dim: int = -1, radius: float = 1.0) -> Tensor:
    r"""Euclidean projection onto the scaled simplex :math:`\{z \ge 0,\ \mathbf 1^\top z = r\}`.

    Sort-based and exact (Duchi et al. 2008); differentiable almost everywhere through
    autograd. With ``radius=1`` this equals :func:`sparsemax` (which has a cheaper custom
    backward).

    Parameters
    ----------
    v : Tensor
        Points to project, any shape; floating point, finite.
    dim : int, default -1
        The dimension constrained to the simplex.
    radius : float, default 1.0
        The sum r > 0 of each projected vector.

    Returns
    -------
    Tensor
        The projections, same shape as ``v``.
    """
    dim = _check_vector(v, dim)
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    w = v.movedim(dim, -1)
    out = torch.clamp(w - _simplex_threshold(w, radius), min=0)
    return out.movedim(-1, dim)


def _check_threshold(x: Tensor, threshold: float | Tensor) -> Tensor | float:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point torch.Tensor")
    if isinstance(threshold, Tensor):
        if bool((threshold < 0).any()) or not bool(torch.isfinite(threshold).all()):
            raise ValueError("threshold must be finite and non-negative")
        try:
            torch.broadcast_shapes(threshold.shape, x.shape)
        except RuntimeError:
            raise ValueError(
                f"threshold of shape {tuple(threshold.shape)} does not broadcast "
                f"against x of shape {tuple(x.shape)}"
            ) from None
    elif not (threshold >= 0 and threshold < float("inf")):
        raise ValueError(f"threshold must be finite and non-negative, got {threshold}")
    return threshold


def soft_threshold(x: Tensor, threshold: float | Tensor) -> Tensor:
    r"""Soft thresholding, the prox of :math:`t\lVert\cdot\rVert_1`:
    :math:`\operatorname{sign}(x)\max(|x| - t, 0)`.

    Parameters
    ----------
    x : Tensor
        Input, any shape.
    threshold : float or Tensor
        t ≥ 0, a scalar or a tensor broadcastable against ``x``.
    """
    threshold = _check_threshold(x, threshold)
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0)


def hard_threshold(x: Tensor, threshold: float | Tensor) -> Tensor:
    r"""Hard thresholding, the prox of :math:`\tfrac{t^2}{2}\lVert\cdot\rVert_0`:
    :math:`x \cdot \mathbf 1[|x| > t]`.

    Parameters
    ----------
    x : Tensor
        Input, any shape.
    threshold : float or Tensor
        t ≥ 0, a scalar or a tensor broadcastable against ``x``.
    """
    threshold = _check_threshold(x, threshold)
    return x * (x.abs() > threshold).to(x.dtype)
