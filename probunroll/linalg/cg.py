"""Batched preconditioned conjugate gradients with per-system stopping.

Solves ``A x = b`` for a batch of symmetric positive definite systems at once: ``B`` has shape
``(..., n)``, one right-hand side per row, and ``A`` applies to ``(..., n)`` (a callable, a
``(..., n, n)`` tensor whose batch dimensions broadcast against ``B``'s, or a probunroll
operator).

How this CG differs from the textbook one (Hestenes & Stiefel 1952; Saad, *Iterative Methods
for Sparse Linear Systems*, Alg. 9.1), and why:

- **Per-system stopping.** Each system stops when *its own* relative residual
  ``‖b − A x‖ / ‖b‖ ≤ tol`` (or, with ``atol``, ``‖b − A x‖ ≤ max(tol·‖b‖, atol)``; either
  in the preconditioned norm with ``norm="preconditioned"``). A converged system stops
  updating (its step size is masked to zero), so a hard system in the batch never changes
  an easy one's answer, and the research code's batch-global rule (a mean residual over all
  systems) is gone.
- **Dtype-aware guards.** Besides ``tol``, a system freezes only when
  ``‖r‖ ≤ tiny^(1/5)·‖b‖`` (``tiny`` of its dtype: 1e-62 in float64, 2e-8 in float32), before
  the squares met in backward underflow; there is no fixed 1e-10 floor that caps float64
  accuracy, and a fixed-step run keeps its Lanczos coefficients meaningful to the end.
- **Residual replacement.** Every ``replace_every`` steps the recursive residual of the active
  systems is replaced by the true one ``b − A x`` (van der Vorst & Ye 2000), so the stopping
  test does not drift away from the truth.
- **Honest reporting.** ``residual`` is the true relative residual after the loop, computed with
  one extra matrix-vector product; systems that missed ``tol`` trigger one
  :class:`~probunroll.NumericalWarning` naming how many and the worst residual.
- **Breakdown raises.** ``pᵀAp ≤ 0`` or NaN on an active system means A is not SPD (or the
  input is broken): :class:`~probunroll.BreakdownError`, never garbage.
- **No allocation without autograd.** With no graph to record (``grad="none"``, the
  implicit mode's solves) x, r and p are updated in place.
- **Host syncs are rare.** The "any system still active?" test needs the host; it runs every
  ``check_every`` steps (every step on CPU, every 8 on CUDA), and never in a fixed-step run
  (``tol=None``), whose breakdown check waits for the end. Frozen systems cost a masked
  update in between, nothing more.
- **Lanczos coefficients.** With ``lanczos=True`` the step sizes ``a_j`` and direction ratios
  ``b_j`` are kept per system together with each system's true length, so the tridiagonal of
  :func:`probunroll.linalg.lanczos_tridiagonal` has no roundoff-level tail from systems that
  had already converged.

Differentiation is the caller's choice (``grad=``): ``"unroll"`` records every step for
autograd (fixed iteration counts allowed: ``tol=None, max_iters=I``), ``"implicit"`` solves
once without a graph and differentiates by one adjoint solve ``A λ = ∂L/∂x`` (so
``∂L/∂b = λ`` and ``∂L/∂θ = −λᵀ (∂A/∂θ) x``), and ``"none"`` records nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from probunroll._capture import capturing
from probunroll._errors import BreakdownError, NumericalWarning

__all__ = ["CGResult", "LanczosCoefficients", "cg", "matvec_of"]

Matvec = Callable[[Tensor], Tensor]
GRAD_MODES = ("unroll", "implicit", "none")
NORMS = ("residual", "preconditioned")


@dataclass(frozen=True)
class LanczosCoefficients:
    """CG step sizes and direction ratios per system.

    Attributes
    ----------
    alphas : Tensor, shape (..., U)
        Step sizes ``a_j = r_jᵀz_j / p_jᵀAp_j``; zero past a system's length.
    betas : Tensor, shape (..., U)
        Direction ratios ``b_j = r_{j+1}ᵀz_{j+1} / r_jᵀz_j``; zero past a system's length.
    lengths : Tensor, shape (...), int64
        Number of CG steps each system took; entries past it are padding.
    start_norm_sq : Tensor, shape (...)
        ``r_0ᵀ M⁻¹ r_0``: the squared norm of the Lanczos starting vector ``M^{-1/2} r_0``.
    """

    alphas: Tensor
    betas: Tensor
    lengths: Tensor
    start_norm_sq: Tensor


@dataclass(frozen=True)
class CGResult:
    """Result of :func:`cg`.

    Attributes
    ----------
    x : Tensor, shape (..., n)
        The solutions.
    iterations : Tensor, shape (...), int64
        CG steps each system took.
    converged : Tensor, shape (...), bool
        Whether each system reached ``tol`` (always True when ``tol`` is None).
    residual : Tensor, shape (...)
        True relative residual ``‖b − A x‖ / ‖b‖`` of each system (0 where b = 0), in the
        norm the solve stopped on (``norm="preconditioned"``: ``‖b − Ax‖_{M⁻¹} / ‖b‖_{M⁻¹}``,
        ``‖v‖_{M⁻¹} = √(vᵀM⁻¹v)``). It costs one matrix-vector product: computed by the
        solver when some system missed ``tol`` by its recursive residual, otherwise on first
        access.
    lanczos : LanczosCoefficients or None
        The CG coefficients, when ``lanczos=True``.
    steps : int
        Loop iterations executed (the number of batched matrix-vector products, not counting
        the initial and final residuals and residual replacements).
    """

    x: Tensor
    iterations: Tensor
    converged: Tensor
    _residual: Tensor | None
    lanczos: LanczosCoefficients | None = None
    steps: int = 0
    _residual_fn: Callable[[], Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def residual(self) -> Tensor:
        if self._residual is None:
            assert self._residual_fn is not None
            object.__setattr__(self, "_residual", self._residual_fn())
            object.__setattr__(self, "_residual_fn", None)
        assert self._residual is not None
        return self._residual


def _broke(min_curv: Tensor) -> bool:
    """Whether any system met pᵀAp ≤ 0 or NaN (one host sync; False while a CUDA graph is
    being captured, where the caller checks the outputs after replay)."""
    if capturing(min_curv):
        return False
    return not bool((min_curv > 0).all())


def matvec_of(A: object, n: int | None = None) -> Matvec:
    """Return a function applying ``A`` to ``(..., n)`` tensors.

    ``A`` may be a ``(..., n, n)`` tensor (batched matrix-vector products with broadcasting),
    an operator with ``shape`` and ``__call__``, or any callable.
    """
    if isinstance(A, Tensor):
        if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
            raise ValueError(f"A must be square in its last two dims, got shape {tuple(A.shape)}")
        if n is not None and A.shape[-1] != n:
            raise ValueError(f"A is {A.shape[-1]}x{A.shape[-1]} but the systems have size {n}")
        if A.ndim == 2:
            return lambda v: v @ A.mT
        return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)
    shape = getattr(A, "shape", None)
    if shape is not None and callable(A):
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"A must be a square operator, got shape {tuple(shape)}")
        if n is not None and shape[1] != n:
            raise ValueError(f"A acts on size {shape[1]} but the systems have size {n}")
        return A  # type: ignore[return-value]
    if callable(A):
        return A  # type: ignore[return-value]
    raise ValueError(f"A must be a tensor, an operator or a callable, got {type(A).__name__}")


class _Jacobi:
    """``r ↦ M⁻¹ r`` for a diagonal ``M⁻¹``; its output is always a fresh tensor."""

    fresh = True

    def __init__(self, diag: Tensor) -> None:
        self.diag = diag

    def __call__(self, r: Tensor) -> Tensor:
        return self.diag * r


def _preconditioner_of(M_inv: object, B: Tensor) -> Matvec | None:
    if M_inv is None:
        return None
    if isinstance(M_inv, Tensor):
        if M_inv.device != B.device or M_inv.dtype != B.dtype:
            raise ValueError(
                f"M_inv has dtype {M_inv.dtype} on {M_inv.device}, B has {B.dtype} on {B.device}"
            )
        try:
            torch.broadcast_shapes(M_inv.shape, B.shape)
        except RuntimeError:
            raise ValueError(
                f"M_inv (the diagonal of M⁻¹) has shape {tuple(M_inv.shape)}, "
                f"not broadcastable to B's {tuple(B.shape)}"
            ) from None
        if not all_positive_finite(M_inv):
            raise ValueError("M_inv (the diagonal of M⁻¹) must be finite and positive")
        return _Jacobi(M_inv)
    if callable(M_inv):
        return M_inv  # type: ignore[return-value]
    raise ValueError(f"M_inv must be None, a tensor or a callable, got {type(M_inv).__name__}")


def _all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf: one sum (NaN/Inf propagate through it), and the exact
    elementwise check only when the sum is not finite (NaN/Inf present, or overflow). True
    unchecked while a CUDA graph is being captured (no host sync allowed)."""
    if capturing(t):
        return True
    with torch.no_grad():
        return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def all_positive_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite and > 0: one ``aminmax`` (NaN propagates). True
    unchecked while a CUDA graph is being captured (no host sync allowed)."""
    if capturing(t):
        return True
    with torch.no_grad():
        lo, hi = torch.aminmax(t)
    return bool(lo > 0) and bool(hi < math.inf)


def _check_tolerance(name: str, tol: float | Tensor | None, B: Tensor) -> None:
    """A tolerance is None, a float ≥ 0, or a tensor of finite values ≥ 0 broadcastable to
    ``B``'s batch shape."""
    a_name = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    if isinstance(tol, Tensor):  # per-system tolerances
        try:
            torch.broadcast_shapes(tol.shape, B.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"{a_name} tensor must broadcast against B's batch shape "
                f"{tuple(B.shape[:-1])}, got {tuple(tol.shape)}"
            ) from None
        if tol.device != B.device or not tol.is_floating_point():
            raise ValueError(f"{a_name} tensor must be real and on B's device {B.device}")
        if not capturing(tol) and not bool((tol >= 0).all() & torch.isfinite(tol).all()):
            raise ValueError(f"{a_name} tensor must hold finite values ≥ 0")
    elif tol is not None and not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"{name} must be a finite number ≥ 0 or None, got {tol}")


def _validate(
    A: object,
    B: Tensor,
    x0: Tensor | None,
    tol: float | Tensor | None,
    grad: str,
    atol: float | Tensor | None = None,
) -> None:
    if not isinstance(B, Tensor):
        raise ValueError(f"B must be a torch.Tensor of shape (..., n), got {type(B).__name__}")
    if B.ndim < 1 or B.shape[-1] == 0:
        raise ValueError(f"B must have shape (..., n) with n ≥ 1, got {tuple(B.shape)}")
    if not B.is_floating_point():
        raise ValueError(f"B must be a real floating tensor, got dtype {B.dtype}")
    if not _all_finite(B):
        raise ValueError("B contains NaN or Inf")
    if isinstance(A, Tensor):
        if A.device != B.device or A.dtype != B.dtype:
            raise ValueError(f"A has dtype {A.dtype} on {A.device}, B has {B.dtype} on {B.device}")
        try:
            torch.broadcast_shapes(A.shape[:-2], B.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"A's batch shape {tuple(A.shape[:-2])} does not broadcast against "
                f"B's {tuple(B.shape[:-1])}"
            ) from None
    if x0 is not None:
        if not isinstance(x0, Tensor) or x0.shape != B.shape:
            got = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
            raise ValueError(f"x0 must have B's shape {tuple(B.shape)}, got {got}")
        if x0.device != B.device or x0.dtype != B.dtype:
            raise ValueError(
                f"x0 has dtype {x0.dtype} on {x0.device}, B has {B.dtype} on {B.device}"
            )
        if not _all_finite(x0):
            raise ValueError("x0 contains NaN or Inf")
    _check_tolerance("tol", tol, B)
    _check_tolerance("atol", atol, B)
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")


def cg(
    A: object,
    B: Tensor,
    M_inv: object = None,
    tol: float | Tensor | None = 1e-6,
    max_iters: int | None = None,
    x0: Tensor | None = None,
    grad: str = "unroll",
    lanczos: bool = False,
    *,
    warn: bool = True,
    check_every: int | None = None,
    replace_every: int = 50,
    checkpoint_every: int = 0,
    norm: str = "residual",
    atol: float | Tensor | None = None,
) -> CGResult:
    """Solve the SPD systems ``A x = b`` for every row ``b`` of ``B`` by preconditioned CG.

    Parameters
    ----------
    A : Tensor (..., n, n), operator, or callable
        The SPD matrix or its action on ``(..., n)`` tensors.
    B : Tensor, shape (..., n)
        Right-hand sides, one system per row. Batch dimensions broadcast against ``A``'s.
    M_inv : None, Tensor or callable
        Preconditioner: a callable applying ``M⁻¹`` to ``(..., n)`` or a tensor broadcastable
        to ``B`` holding the diagonal of ``M⁻¹`` (Jacobi: ``1 / diag(A)``).
    tol : float, Tensor or None
        Per-system relative residual tolerance; a tensor (broadcastable to ``B.shape[:-1]``)
        gives each system its own. ``None`` (or 0) runs exactly ``max_iters``
        steps (a fixed unrolled solver; systems at the rounding floor freeze) and never warns.
    max_iters : int, optional
        Step limit; defaults to ``10 n``.
    x0 : Tensor, shape (..., n), optional
        Warm start.
    grad : {"unroll", "implicit", "none"}
        How gradients reach ``A`` and ``B``; see the module docstring.
    lanczos : bool
        Keep the CG coefficients per system (for :func:`lanczos_tridiagonal` / SLQ).
    warn : bool
        Warn with :class:`~probunroll.NumericalWarning` when systems miss ``tol``.
    check_every : int, optional
        Steps between host-side "all converged?" checks (default 1 on CPU, 8 on CUDA).
    replace_every : int
        Steps between true-residual replacements (0 disables).
    checkpoint_every : int
        With ``grad="unroll"``: recompute each run of this many steps in backward
        (``torch.utils.checkpoint``) instead of storing it, so memory stops growing with the
        step count. 0 (default) stores everything.
    norm : {"residual", "preconditioned"}
        The norm ``tol`` is measured in: ``‖r‖ ≤ tol·‖b‖`` (default), or
        ``‖r‖_{M⁻¹} ≤ tol·‖b‖_{M⁻¹}`` with ``‖v‖_{M⁻¹} = √(vᵀM⁻¹v)``, the quantity ``rᵀz``
        that preconditioned CG already forms each step (no extra work but one ``M⁻¹b``). When
        ``M ≈ A`` it approximates the error's energy norm, ``‖r‖_{M⁻¹} ≈ ‖r‖_{A⁻¹} =
        ‖x − A⁻¹b‖_A`` (Arioli, *Numer. Math.* 97, 2004; Strakoš & Tichý, *ETNA* 13, 2002),
        which the plain residual can badly misjudge when ``A`` is ill conditioned. Without a
        preconditioner both are the same.
    atol : float, Tensor or None
        Absolute per-system tolerance in the same norm (a tensor gives each system its own):
        a system stops at ``‖r‖ ≤ max(tol·‖b‖, atol)`` (``tol=None`` counts as 0), the rule
        of SciPy's ``cg(rtol, atol)``. An error bound that is absolute, such as
        ``‖x − A⁻¹b‖_A ≤ τ`` through ``norm="preconditioned"``, is ``tol=None, atol=τ``:
        no ``‖b‖`` to form and divide by. ``residual`` stays relative to ``‖b‖``. With
        ``grad="implicit"`` the adjoint solve, whose right-hand side has other units, stops
        at the forward solve's relative equivalent ``max(tol, atol/‖b‖)``.

    Returns
    -------
    CGResult

    Raises
    ------
    ValueError
        Bad shapes, dtypes, devices, NaN/Inf in ``B`` or ``x0``, bad ``tol``, ``atol`` or
        ``grad``.
    BreakdownError
        ``pᵀAp ≤ 0`` or NaN on an active system (``A`` is not SPD).

    Examples
    --------
    >>> import torch, probunroll as pu
    >>> A = torch.eye(3, dtype=torch.float64) * 2
    >>> pu.linalg.cg(A, torch.ones(3, dtype=torch.float64)).x
    tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)
    """
    _validate(A, B, x0, tol, grad, atol)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    n = B.shape[-1]
    matvec = matvec_of(A, n)
    if isinstance(A, Tensor):  # one system per broadcast batch entry
        B = B.expand(*torch.broadcast_shapes(A.shape[:-2], B.shape[:-1]), n)
        if x0 is not None:
            x0 = x0.expand_as(B)
    precond = _preconditioner_of(M_inv, B)
    if max_iters is None:
        max_iters = 10 * n
    if max_iters < 0:
        raise ValueError(f"max_iters must be ≥ 0, got {max_iters}")
    if check_every is None:
        check_every = 8 if B.device.type == "cuda" else 1
    kwargs = dict(
        tol=tol,
        atol=atol,
        max_iters=max_iters,
        lanczos=lanczos,
        warn=warn,
        check_every=check_every,
        replace_every=replace_every,
        preconditioned_norm=norm == "preconditioned" and precond is not None,
    )
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be ≥ 0, got {checkpoint_every}")
    if grad == "unroll":
        return _cg_loop(matvec, B, precond, x0, checkpoint_every=checkpoint_every, **kwargs)
    with torch.no_grad():
        res = _cg_loop(matvec, B.detach(), precond, None if x0 is None else x0.detach(), **kwargs)
    if grad == "none" or not torch.is_grad_enabled():
        return res
    # Implicit gradient: x = y + S(b − A y) with y the detached solution and S an autograd
    # function whose value is 0 and whose vector-Jacobian product is A⁻¹ (one adjoint CG).
    y = res.x
    r = B - matvec(y)
    if not r.requires_grad:
        return res
    adjoint_kwargs = dict(kwargs, lanczos=False)
    if atol is not None:  # the adjoint's right-hand side has other units: relative only
        adjoint_kwargs.update(tol=_relative_tolerance(B, precond, kwargs), atol=None)
    x = y + _ImplicitSolve.apply(r, matvec, precond, adjoint_kwargs)
    return replace(res, x=x)


class _ImplicitSolve(torch.autograd.Function):
    """Value 0, vector-Jacobian product ``g ↦ A⁻¹ g`` (A symmetric)."""

    @staticmethod
    def forward(ctx, r, matvec, precond, kwargs):  # type: ignore[override]
        ctx.matvec, ctx.precond, ctx.kwargs = matvec, precond, kwargs
        return torch.zeros_like(r)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        with torch.no_grad():
            lam = _cg_loop(ctx.matvec, grad_out, ctx.precond, None, **ctx.kwargs).x
        return lam, None, None, None


def _relative_tolerance(B: Tensor, precond: Matvec | None, kwargs: dict) -> Tensor:
    """``max(tol, atol/‖b‖)`` per system (shape ``B.shape[:-1]``), in the solve's norm."""
    with torch.no_grad():
        b = B.detach()
        if kwargs["preconditioned_norm"]:
            b_norm = _dot(b, precond(b)).clamp_min(0).sqrt().squeeze(-1)
        else:
            b_norm = torch.linalg.vector_norm(b, dim=-1)
        rel = torch.as_tensor(kwargs["atol"], dtype=b.dtype, device=b.device) / b_norm.clamp_min(
            torch.finfo(b.dtype).tiny
        )
        if kwargs["tol"] is not None:
            rel = torch.maximum(rel, torch.as_tensor(kwargs["tol"], dtype=b.dtype, device=b.device))
        return rel.expand(b.shape[:-1])


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise inner products, shape (..., 1)."""
    return (u * v).sum(-1, keepdim=True)


def _cg_loop(
    matvec: Matvec,
    B: Tensor,
    precond: Matvec | None,
    x0: Tensor | None,
    *,
    tol: float | Tensor | None,
    max_iters: int,
    lanczos: bool,
    warn: bool,
    check_every: int,
    replace_every: int,
    checkpoint_every: int = 0,
    preconditioned_norm: bool = False,
    atol: float | Tensor | None = None,
) -> CGResult:
    def unset(t: float | Tensor | None) -> bool:
        return t is None or (not isinstance(t, Tensor) and t == 0)

    fixed = unset(tol) and unset(atol)
    per_system = isinstance(tol, Tensor) or isinstance(atol, Tensor)
    told = "their tolerance" if per_system or not unset(atol) else f"tol={tol:g}" if tol else ""
    # per-system: (..., 1) like the other per-system scalars
    tol, atol = (
        t.detach().to(B.dtype).expand(B.shape[:-1]).unsqueeze(-1) if isinstance(t, Tensor) else t
        for t in (tol, atol)
    )
    # Per-system scalars live as (..., 1) tensors so that they broadcast against (..., n)
    # without a view op per use; they are squeezed on the way out.
    if x0 is None:
        x = torch.zeros_like(B)
        r = B
    else:
        x = torch.where((B != 0).any(-1, keepdim=True), x0, torch.zeros_like(x0))
        r = B - matvec(x)
        r = r.expand_as(B) if r.shape != B.shape else r
    # Without autograd the loop updates x, r, p in place; they must own their storage (x is
    # fresh, but r may be B itself and p may be r).
    inplace = not torch.is_grad_enabled()
    if inplace:
        r = r.clone()
    z = r if precond is None else precond(r)
    rz = _dot(r, z)
    # ‖b‖, or ‖b‖_{M⁻¹} = √(bᵀM⁻¹b) when tol is measured in the preconditioned norm (from a
    # cold start that is √(r₀ᵀz₀), already formed; a warm start pays one M⁻¹b)
    if not preconditioned_norm:
        b_norm = torch.linalg.vector_norm(B, dim=-1, keepdim=True)
    elif x0 is None:
        b_norm = rz.detach().clamp_min(0).sqrt()
    else:
        b_norm = _dot(B.detach(), precond(B.detach())).clamp_min(0).sqrt()
    if x0 is None:
        r_norm = b_norm
    elif preconditioned_norm:  # the preconditioned norm of a warm start's residual
        r_norm = rz.clamp_min(0).sqrt()
    else:
        r_norm = torch.linalg.vector_norm(r, dim=-1, keepdim=True)
    nonzero = b_norm > 0
    b_scale = torch.where(nonzero, b_norm, torch.ones_like(b_norm))
    # Underflow guard: the recursive residual may fall far below eps·‖b‖ while the CG
    # coefficients stay meaningful (Lanczos), so a system only freezes before its quantities
    # underflow. Backward through a = rᵀz / pᵀAp squares pᵀAp ~ ‖r‖², so the floor on ‖r‖/‖b‖
    # is tiny^(1/5) (1e-62 in float64, 2e-8 in float32), where (pᵀAp)² is still normal.
    floor = torch.finfo(B.dtype).tiny ** 0.2 * b_scale
    # the goal ‖r‖ ≤ max(tol·‖b‖, atol), absolute, (..., 1)
    goal = torch.zeros_like(b_scale) if unset(tol) else tol * b_scale
    if not unset(atol):
        goal = goal.maximum(atol) if isinstance(atol, Tensor) else goal.clamp_min(atol)
    stop = floor if fixed else torch.maximum(goal, floor)
    # p is updated in place: it must not share storage with r (no preconditioner) or with
    # whatever a user's preconditioner returned (it may return its input or a cached buffer).
    p = z.clone() if inplace and not getattr(precond, "fresh", False) else z
    active = nonzero & (r_norm > stop)
    start_norm_sq = rz
    # smallest pᵀAp seen per system (NaN propagates): breakdown = not (min_curv > 0)
    min_curv = torch.full(active.shape, math.inf, dtype=B.dtype, device=B.device)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    actives: list[Tensor] = []  # per step: which systems it advanced (summed once at the end)
    one = torch.ones((), dtype=B.dtype, device=B.device)
    zero = torch.zeros((), dtype=B.dtype, device=B.device)

    stop_sq = stop * stop

    def step(k: int, x, r, p, rz, active, min_curv):
        # Kernel count matters on GPUs (each op is a launch) and every small op costs a
        # dispatch on CPUs: fused addcmul updates, one shared guarded denominator, rᵀr reused
        # as ‖r‖² when unpreconditioned, and no per-step host check of breakdown.
        Ap = matvec(p)
        curv = torch.where(active, _dot(p, Ap), one)  # pᵀAp, 1 for frozen systems
        min_curv = torch.minimum(min_curv, curv)
        alpha = torch.where(active, rz / curv, zero)
        if inplace:  # no graph to keep: update the loop-owned buffers without allocating
            x.addcmul_(alpha, p)
            r.addcmul_(alpha, Ap, value=-1)
        else:
            x = torch.addcmul(x, alpha, p)
            r = torch.addcmul(r, alpha, Ap, value=-1)
        if replace_every and (k + 1) % replace_every == 0:
            r = torch.where(active, B - matvec(x), r)
        z = r if precond is None else precond(r)
        rz_new = _dot(r, z)
        if inplace:
            # Without autograd a NaN in the unselected branch (a frozen system's 0/0) is
            # harmless, so the denominator needs no guard; p ← z + βp in one fused kernel.
            beta = torch.where(active, rz_new / rz, zero)
            p = torch.addcmul(z, beta, p, out=p)
        else:
            beta = torch.where(active, rz_new / torch.where(active, rz, one), zero)
            p = torch.addcmul(z, beta, p)
        # frozen systems' rz is never used again: their alpha and beta are masked
        if precond is None or preconditioned_norm:  # rᵀr or rᵀM⁻¹r, already formed
            still = active & (rz_new > stop_sq)
        else:
            still = active & (torch.linalg.vector_norm(r, dim=-1, keepdim=True) > stop)
        return x, r, p, rz_new, still, min_curv, alpha, beta

    def segment(k0: int, count: int, x, r, p, rz, active, min_curv):
        seg_alpha, seg_beta, seg_active = [], [], []
        for k in range(k0, k0 + count):
            seg_active.append(active)
            x, r, p, rz, active, min_curv, alpha, beta = step(k, x, r, p, rz, active, min_curv)
            seg_alpha.append(alpha)
            seg_beta.append(beta)
        return (
            x,
            r,
            p,
            rz,
            active,
            min_curv,
            torch.cat(seg_alpha, -1),
            torch.cat(seg_beta, -1),
            torch.cat(seg_active, -1),
        )

    # Between host checks the loop runs in segments; with checkpoint_every and autograd on,
    # each segment is recomputed in backward instead of storing its activations, so memory
    # grows with I / checkpoint_every instead of I. Breakdown (pᵀAp ≤ 0 or NaN) is checked on
    # the host every 8 checks only: a broken system wastes at most a few steps before the raise.
    use_ckpt = bool(checkpoint_every) and torch.is_grad_enabled()
    # While a CUDA graph is captured a tolerance run cannot stop early (no host sync): it runs
    # max_iters steps, converged systems frozen by their masks as usual.
    captured = capturing(B)
    steps = checks = 0
    while steps < max_iters:
        # A fixed-step run never stops early: no host sync inside its loop at all.
        check = use_ckpt or steps % check_every == 0
        if not fixed and check and not captured:
            checks += 1
            if not bool(active.any()) or (checks % 8 == 0 and _broke(min_curv)):
                break
        if use_ckpt:
            count = min(checkpoint_every, max_iters - steps)
            x, r, p, rz, active, min_curv, seg_alpha, seg_beta, seg_active = (
                torch.utils.checkpoint.checkpoint(
                    segment, steps, count, x, r, p, rz, active, min_curv, use_reentrant=False
                )
            )
        else:  # the lean path: one step, no concatenation
            count, seg_active = 1, active
            x, r, p, rz, active, min_curv, seg_alpha, seg_beta = step(
                steps, x, r, p, rz, active, min_curv
            )
        actives.append(seg_active)
        if lanczos:
            alphas.append(seg_alpha)
            betas.append(seg_beta)
        steps += count

    batch = B.shape[:-1]
    if actives:
        iterations = torch.cat(actives, -1).sum(-1).expand(batch)
    else:
        iterations = torch.zeros(batch, dtype=torch.int64, device=B.device)
    active, min_curv, b_scale = active.squeeze(-1), min_curv.squeeze(-1), b_scale.squeeze(-1)
    bound = (goal.squeeze(-1) / b_scale).expand(batch)  # the goal relative to ‖b‖
    if _broke(min_curv):
        bad = ~(min_curv > 0)
        count = int(bad.sum())
        raise BreakdownError(
            f"cg: breakdown (pᵀAp ≤ 0 or NaN) in {count} of {bad.numel()} systems after "
            f"{steps} steps; A is not symmetric positive definite"
        )

    def true_residual() -> Tensor:
        with torch.no_grad():
            r_true = B - matvec(x)
            if preconditioned_norm:
                norm = _dot(r_true, precond(r_true)).clamp_min(0).sqrt().squeeze(-1)
            else:
                norm = torch.linalg.vector_norm(r_true, dim=-1)
            return (norm / b_scale).detach()

    # The true residual costs one more matvec: computed now only when some system did not
    # meet tol by its recursive residual (its flag and the warning need it), else on access.
    residual = None
    if fixed:
        converged = torch.ones_like(active)
    elif captured:  # no host sync: the recursive residual's verdict only
        converged = ~active
    else:
        residual = true_residual() if bool(active.any()) else None
        if residual is None:
            converged = torch.ones_like(active)
        else:
            # A system is converged if its recursive residual met its goal, or its true
            # residual does.
            converged = ~active | (residual <= bound)
            if warn and not bool(converged.all()):
                missed = int((~converged).sum())
                worst = float(residual[~converged].max())
                warnings.warn(
                    f"cg: {missed} of {converged.numel()} systems did not reach {told} in "
                    f"{max_iters} iterations; worst relative residual {worst:.3g}",
                    NumericalWarning,
                    stacklevel=3,
                )
    coeffs = None
    if lanczos:
        if alphas:
            a = torch.cat([t.expand(*batch, t.shape[-1]) for t in alphas], dim=-1)
            b = torch.cat([t.expand(*batch, t.shape[-1]) for t in betas], dim=-1)
        else:
            a = B.new_zeros((*batch, 0))
            b = B.new_zeros((*batch, 0))
        coeffs = LanczosCoefficients(a, b, iterations, start_norm_sq.squeeze(-1).expand(batch))
    return CGResult(x, iterations, converged, residual, coeffs, steps, true_residual)
