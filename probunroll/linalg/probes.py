"""Random probes: diagonal of an inverse, SLQ log-determinants, perturb-and-solve samples.

All estimators share one batched CG solve of ``A X = [b, M^{1/2} z_1, …, M^{1/2} z_K]`` with
Rademacher probes ``z_k`` (entries ±1, E[zzᵀ] = I) and a Jacobi preconditioner ``M`` (any
positive diagonal). From the solutions ``x_k = A⁻¹ M^{1/2} z_k``:

- **Diagonal of A⁻¹** (Bekas, Kokiopoulou & Saad, Appl. Numer. Math. 57, 2007), rotated:
  ``d̂ = (1/K) Σ_k z_k ⊙ M^{-1/2} x_k``. Unbiased because E[z zᵀ] = I and the diagonal of
  ``M^{-1/2} A⁻¹ M^{1/2}`` equals that of ``A⁻¹``. Its variance at coordinate j is
  ``(1/K) Σ_{i≠j} Σ_ij² M_i / M_j`` (Σ = A⁻¹): coordinates with a large preconditioner entry
  (heavily regularised, e.g. pruned SBL coefficients) get a far smaller spread than with plain
  probes, where the variance is ``(1/K) Σ_{i≠j} Σ_ij²``.
- **log det A** by stochastic Lanczos quadrature from the same CG runs (see
  :mod:`probunroll.linalg.lanczos`): PCG on the right-hand side ``M^{1/2} z`` is Lanczos on
  ``Ã = M^{-1/2} A M^{-1/2}`` started at ``z``, so
  ``log det A ≈ (1/K) Σ_k zₖᵀ log(Ã) zₖ + Σ_i log M_i``.
- **Perturb-and-solve posterior samples** (Papandreou & Yuille, ICCV 2011): for
  ``A = P + Φᵀ Ω Ψ Φ`` with diagonal P, Ψ and a 0/1 mask Ω, ``ε = P^{1/2} u + Φᵀ Ω Ψ^{1/2} v``
  with u, v standard normal has Cov(ε) = A, so ``A⁻¹ ε ~ N(0, A⁻¹)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from probunroll._capture import capturing
from probunroll.linalg.cg import CGResult, LanczosCoefficients, all_positive_finite, cg
from probunroll.linalg.lanczos import lanczos_quadrature

__all__ = [
    "ProbeSolveResult",
    "diag_inverse",
    "gaussian_perturbation",
    "perturb_and_solve",
    "probe_solve",
    "rademacher",
    "slq_logdet",
]


def _draw(kind: str, shape, dtype, device, generator: torch.Generator | None) -> Tensor:
    gen_device = generator.device if generator is not None else device
    if kind == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=gen_device).to(dtype) * 2 - 1
    else:
        z = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return z.to(device=device, dtype=dtype)


def rademacher(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rademacher probes (independent ±1 entries) of the given shape."""
    return _draw("rademacher", tuple(shape), dtype, device, generator)


@dataclass(frozen=True)
class ProbeSolveResult:
    """Result of :func:`probe_solve`.

    Attributes
    ----------
    mean : Tensor, shape (*batch, n), or None
        ``A⁻¹ b`` (None when only probe systems were solved).
    diag : Tensor, shape (*batch, n)
        Unbiased estimate of ``diag(A⁻¹)``.
    logdet : Tensor (*batch) or None
        SLQ estimate of ``log det A`` (when asked).
    x : Tensor, shape (K+1, *batch, n)
        All solutions, ``x[0]`` the mean system; pass back as ``x0`` to warm start.
    probes : Tensor, shape (K, *batch, n)
        The probes ``z`` used.
    cg : CGResult
        The underlying solve (per-system iterations, convergence, residuals).
    """

    mean: Tensor | None
    diag: Tensor
    logdet: Tensor | None
    x: Tensor
    probes: Tensor
    cg: CGResult


def _check_diag(M_diag: Tensor | None, n: int) -> None:
    if M_diag is None:
        return
    if not isinstance(M_diag, Tensor) or M_diag.ndim < 1 or M_diag.shape[-1] != n:
        got = tuple(M_diag.shape) if isinstance(M_diag, Tensor) else type(M_diag).__name__
        raise ValueError(f"M_diag must be a tensor of shape (..., {n}), got {got}")
    if not all_positive_finite(M_diag):
        raise ValueError("M_diag must be finite and positive")


def probe_solve(
    A: object,
    b: Tensor,
    num_probes: int = 10,
    *,
    M_diag: Tensor | None = None,
    probes: Tensor | None = None,
    generator: torch.Generator | None = None,
    tol: float | None = 1e-6,
    max_iters: int | None = None,
    x0: Tensor | None = None,
    rotate: bool = True,
    logdet: bool = False,
    grad: str = "none",
    warn: bool = True,
) -> ProbeSolveResult:
    """Mean, diagonal of the inverse and (optionally) log det from ONE batched CG solve.

    Solves ``A X = [b, M^{1/2} z_1, …, M^{1/2} z_K]`` (shape ``(K+1, *batch, n)``) with the
    Jacobi preconditioner ``M = M_diag`` and Rademacher probes; see the module docstring.

    Parameters
    ----------
    A : Tensor (..., n, n), operator or callable
        SPD operator on ``(..., n)``.
    b : Tensor, shape (*batch, n)
        Right-hand side of the mean system.
    num_probes : int
        K, ignored when ``probes`` is given.
    M_diag : Tensor (..., n), optional
        Positive preconditioner diagonal (typically the exact diagonal of A).
    probes : Tensor (K, ..., n), optional
        Probes to use (broadcast against ``(K, *batch, n)``): pass the same probes for systems
        that must be compared with common random numbers (e.g. clusters).
    generator : torch.Generator, optional
        Source of the probes.
    tol, max_iters, grad, warn
        Passed to :func:`~probunroll.linalg.cg`.
    x0 : Tensor (K+1, *batch, n), optional
        Warm start (e.g. the previous ``.x`` when the probes are reused). With ``logdet=True``
        only the mean system may be warm-started (the probe rows must be zero), since SLQ
        needs each probe's Krylov space to start at the probe.
    rotate : bool
        Use right-hand sides ``M^{1/2} z`` (rotated probes). Required for ``logdet`` when
        preconditioned.
    logdet : bool
        Also return the SLQ estimate of ``log det A``.
    """
    if not isinstance(b, Tensor) or b.ndim < 1:
        raise ValueError("b must be a tensor of shape (*batch, n)")
    _check_diag(M_diag, b.shape[-1])
    return _solve_probes(
        A, b, b.shape[-1], b.shape[:-1], b.dtype, b.device, num_probes, M_diag=M_diag,
        probes=probes, generator=generator, tol=tol, max_iters=max_iters, x0=x0, rotate=rotate,
        logdet=logdet, grad=grad, warn=warn,
    )  # fmt: skip


def _solve_probes(
    A: object,
    b: Tensor | None,
    n: int,
    batch: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    num_probes: int,
    *,
    M_diag: Tensor | None,
    probes: Tensor | None = None,
    generator: torch.Generator | None,
    tol: float | None,
    max_iters: int | None,
    x0: Tensor | None = None,
    rotate: bool,
    logdet: bool,
    grad: str = "none",
    warn: bool = True,
) -> ProbeSolveResult:
    """:func:`probe_solve` body; ``b=None`` solves the probe systems only. The callers have
    validated ``M_diag`` (one host sync each, not two)."""
    if logdet and M_diag is not None and not rotate:
        raise ValueError("logdet=True with a preconditioner needs rotate=True")
    first = 0 if b is None else 1  # index of the first probe system
    if logdet and x0 is not None and bool(x0[first:].any()):
        # Lanczos would start at M^{-1/2}(z − A x0) instead of the probe z: a biased log det.
        raise ValueError("x0 must be zero on the probe systems when logdet=True")
    if M_diag is not None:
        batch = torch.broadcast_shapes(batch, M_diag.shape[:-1])
    if probes is None:
        if num_probes < 1:
            raise ValueError(f"num_probes must be ≥ 1, got {num_probes}")
        probes = rademacher(
            (num_probes, *batch, n), dtype=dtype, device=device, generator=generator
        )
    else:
        if probes.ndim < 2 or probes.shape[-1] != n:
            raise ValueError(f"probes must have shape (K, ..., {n}), got {tuple(probes.shape)}")
        batch = torch.broadcast_shapes(batch, probes.shape[1:-1])
    K = probes.shape[0]
    probes = probes.to(dtype=dtype, device=device).expand(K, *batch, n)
    sqrt_m = None if M_diag is None else M_diag.sqrt()
    rhs = probes if (sqrt_m is None or not rotate) else sqrt_m * probes
    B = rhs if b is None else torch.cat([b.expand(*batch, n).unsqueeze(0), rhs], dim=0)
    M_inv = None if M_diag is None else 1 / M_diag
    res = cg(A, B, M_inv, tol=tol, max_iters=max_iters, x0=x0, grad=grad, lanczos=logdet, warn=warn)
    xs = res.x[first:]
    if sqrt_m is not None and rotate:
        xs = xs / sqrt_m
    diag = (probes * xs).mean(0)
    ld = None
    if logdet:
        c = res.lanczos
        assert c is not None
        probe_coeffs = LanczosCoefficients(
            c.alphas[first:], c.betas[first:], c.lengths[first:], c.start_norm_sq[first:]
        )
        ld = lanczos_quadrature(probe_coeffs).mean(0)
        if M_diag is not None:
            ld = ld + torch.log(M_diag).sum(-1)
    mean = None if b is None else res.x[0]
    return ProbeSolveResult(mean, diag, ld, res.x, probes, res)


def _probe_batch(
    A: object, M_diag: Tensor | None, batch_shape
) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
    if batch_shape is None:
        if M_diag is not None:
            batch_shape = M_diag.shape[:-1]
        elif isinstance(A, Tensor):
            batch_shape = A.shape[:-2]
        else:
            batch_shape = ()
    ref = M_diag if M_diag is not None else (A if isinstance(A, Tensor) else None)
    dtype = ref.dtype if ref is not None else torch.float64
    device = ref.device if ref is not None else torch.device("cpu")
    return tuple(batch_shape), dtype, device


def slq_logdet(
    A: object,
    n: int,
    num_probes: int = 30,
    max_iters: int = 100,
    M_diag: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    tol: float | None = 1e-8,
    batch_shape: tuple[int, ...] | None = None,
) -> Tensor:
    """Stochastic Lanczos quadrature estimate of ``log det A`` for a batch of SPD operators.

    ``log det A ≈ (1/K) Σ_k zₖᵀ log(M^{-1/2} A M^{-1/2}) zₖ + Σ_i log M_i``, each quadratic form
    by Lanczos quadrature from the CG run on ``A x = M^{1/2} z`` (module docstring). Systems
    that converge early contribute their own (shorter) tridiagonals; no roundoff tail.

    Parameters
    ----------
    A : Tensor (..., n, n), operator or callable
        SPD operator on ``(*batch, n)``.
    n : int
        Size of the systems.
    num_probes : int
        Number of Rademacher probes K.
    max_iters : int
        Lanczos (CG) steps per probe at most.
    M_diag : Tensor (*batch, n), optional
        Positive Jacobi preconditioner diagonal; its log det is added back.
    generator : torch.Generator, optional
        Source of the probes.
    tol : float or None
        CG tolerance of the probe solves.
    batch_shape : tuple, optional
        Batch shape of A when neither ``M_diag`` nor a tensor ``A`` tells it.

    Returns
    -------
    Tensor, shape (*batch)
    """
    _check_diag(M_diag, n)
    batch, dtype, device = _probe_batch(A, M_diag, batch_shape)
    res = _solve_probes(
        A, None, n, batch, dtype, device, num_probes, M_diag=M_diag, generator=generator,
        tol=tol, max_iters=max_iters, rotate=True, logdet=True, warn=False,
    )  # fmt: skip
    assert res.logdet is not None
    return res.logdet


def diag_inverse(
    A: object,
    n: int,
    num_probes: int = 10,
    M_diag: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    rotate: bool = True,
    tol: float | None = 1e-8,
    max_iters: int | None = None,
    batch_shape: tuple[int, ...] | None = None,
) -> Tensor:
    """Unbiased Rademacher-probe estimate of ``diag(A⁻¹)``.

    ``d̂ = (1/K) Σ_k z_k ⊙ A⁻¹ z_k``, or with ``M_diag`` and ``rotate=True`` the rotated form
    ``d̂ = (1/K) Σ_k z_k ⊙ M^{-1/2} A⁻¹ M^{1/2} z_k`` whose variance on coordinates with a
    large ``M`` is far smaller (module docstring).

    Returns
    -------
    Tensor, shape (*batch, n)
    """
    _check_diag(M_diag, n)
    batch, dtype, device = _probe_batch(A, M_diag, batch_shape)
    res = _solve_probes(
        A, None, n, batch, dtype, device, num_probes, M_diag=M_diag, generator=generator,
        tol=tol, max_iters=max_iters, rotate=rotate, logdet=False,
    )  # fmt: skip
    return res.diag


def gaussian_perturbation(
    prior_precision: Tensor,
    Phi: object,
    noise_precision: Tensor | float,
    num_samples: int,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``ε = P^{1/2} u + Φᵀ Ω Ψ^{1/2} v`` with ``Cov(ε) = P + Φᵀ Ω Ψ Φ``.

    Parameters
    ----------
    prior_precision : Tensor, shape (*batch, D)
        Diagonal of P (positive).
    Phi : Tensor (N, D) or operator with ``.T`` and ``.shape == (N, D)``
        The measurement operator Φ.
    noise_precision : Tensor broadcastable to (*batch, N), or float
        Diagonal of Ψ (positive).
    num_samples : int
        K.
    mask : Tensor broadcastable to (*batch, N), optional
        Ω, 1 for observed entries.
    generator : torch.Generator, optional

    Returns
    -------
    Tensor, shape (K, *batch, D)
    """
    P = prior_precision
    if not isinstance(P, Tensor) or P.ndim < 1:
        raise ValueError("prior_precision must be a tensor of shape (*batch, D)")
    checks = not capturing(P)  # no host sync while a CUDA graph is being captured
    if checks and not bool((P > 0).all()):
        raise ValueError("prior_precision must be positive")
    N = Phi.shape[-2] if isinstance(Phi, Tensor) else Phi.shape[0]
    psi = torch.as_tensor(noise_precision, dtype=P.dtype, device=P.device)
    if checks and not bool((psi > 0).all()):
        raise ValueError("noise_precision must be positive")
    weight = psi.sqrt()
    if mask is not None:
        weight = weight * mask.to(P.dtype)
    batch = torch.broadcast_shapes(P.shape[:-1], weight.shape[:-1] if weight.ndim else ())
    D = P.shape[-1]
    u = _draw("normal", (num_samples, *batch, D), P.dtype, P.device, generator)
    v = _draw("normal", (num_samples, *batch, N), P.dtype, P.device, generator)
    wv = weight * v
    adj = wv @ Phi if isinstance(Phi, Tensor) else Phi.T(wv)
    return P.sqrt() * u + adj


def perturb_and_solve(
    A: object, b: Tensor, eps: Tensor, **cg_kwargs
) -> tuple[Tensor, Tensor, CGResult]:
    """Posterior mean ``A⁻¹ b`` and samples ``A⁻¹ ε_k`` from one batched CG solve.

    Parameters
    ----------
    A : SPD operator on ``(*batch, D)``.
    b : Tensor, shape (*batch, D)
    eps : Tensor, shape (K, *batch, D)
        Perturbations with Cov(ε) = A (:func:`gaussian_perturbation`).
    **cg_kwargs
        Passed to :func:`~probunroll.linalg.cg` (``tol``, ``max_iters``, ``M_inv``, ``grad``…).

    Returns
    -------
    mean : Tensor (*batch, D)
    samples : Tensor (K, *batch, D), distributed N(0, A⁻¹) (centred)
    result : CGResult
    """
    batch = torch.broadcast_shapes(b.shape, eps.shape[1:])
    B = torch.cat([b.expand(batch).unsqueeze(0), eps.expand(eps.shape[0], *batch)], dim=0)
    res = cg(A, B, **cg_kwargs)
    return res.x[0], res.x[1:], res
