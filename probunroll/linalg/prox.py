"""Proximal maps and projections: sparsemax, simplex projection, thresholds, ISTA/FISTA.

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

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "fista",
    "hard_threshold",
    "ista",
    "ista_step",
    "project_l2_ball",
    "project_simplex",
    "soft_threshold",
    "sparsemax",
]


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
