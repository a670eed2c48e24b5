"""Covariance-free E-step (CoFEM): posterior means, variances and log-likelihoods of a batch of
latent Gaussian posteriors from ONE batched preconditioned CG run, never forming ``Σ``.

For every batch entry the ``K + 1`` systems

.. math::

    A\\,[x_0, x_1, \\dots, x_K] = [b,\\; M^{1/2} z_1, \\dots, M^{1/2} z_K]

share the matrix-free operator ``A`` (Rademacher probes ``z_k``, Jacobi preconditioner
``M = diag(A)`` from exact masked Gram diagonals), and give

- the mean :math:`\\mu = x_0`;
- the variances :math:`\\hat d = \\frac1K \\sum_k z_k \\odot M^{-1/2} x_k` (unbiased; the rotated
  probes make heavily regularised coordinates nearly exact);
- :math:`\\log\\det A` by stochastic Lanczos quadrature on the same runs' CG coefficients, hence
  the marginal log-likelihood (``LinearGaussian.marginal_loglik``).

Stopping is per system (``probunroll.linalg.probe_solve``); the mean system is warm-started from
the previous E-step's mean, while the probe systems start from zero so that their Krylov spaces
start at the probes, as SLQ requires. Probes may be shared over batch dimensions (common random
numbers, e.g. over the clusters of CMTCS, which makes between-cluster log-likelihood differences
far less noisy than independent probes do).

References
----------
.. [1] A. Lin, A. H. Song, B. Bilgic, D. Ba, "Covariance-free sparse Bayesian learning",
   IEEE TSP 2022 (arXiv:2105.10439).
.. [2] C. Bekas, E. Kokiopoulou, Y. Saad, "An estimator for the diagonal of a matrix",
   Appl. Numer. Math. 2007.
.. [3] S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
   quadrature", SIAM J. Matrix Anal. Appl. 2017.
.. [4] A. Lin, D. Ba, "An efficient algorithm for clustered multi-task compressive sensing",
   arXiv:2310.00420.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from probunroll.linalg import probe_solve, rademacher
from probunroll.models.base import LatentGaussianModel, LinearGaussian, PosteriorMoments


def rademacher_probes(
    num_probes: int,
    shape: Sequence[int],
    *,
    share_over: Sequence[int] = (),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Rademacher (±1) probes of shape ``(num_probes, *shape)``, constant over ``share_over``.

    ``share_over`` lists batch dimensions of ``shape`` (not counting the probe dimension) along
    which the same probes are used; those dimensions have size 1 in the result and broadcast.
    """
    shape = list(shape)
    for dim in share_over:
        shape[dim] = 1
    return rademacher((num_probes, *shape), dtype=dtype, device=device, generator=generator)


def cofem_posterior(
    lg: LinearGaussian,
    *,
    num_probes: int = 10,
    generator: torch.Generator | None = None,
    share_probes_over: Sequence[int] = (),
    warm_start: Tensor | None = None,
    tol: float = 1e-5,
    max_iters: int = 1000,
    loglik: bool = True,
) -> PosteriorMoments:
    """Covariance-free posterior moments of a batch of linear Gaussian posteriors.

    Parameters
    ----------
    lg : LinearGaussian
        The posteriors, batch shape ``S``, latent dimension ``D``.
    num_probes : int
        Number ``K`` of Rademacher probes.
    generator : torch.Generator, optional
        Source of the probes.
    share_probes_over : sequence of int
        Batch dimensions (indices into ``S``) over which the probes are shared.
    warm_start : Tensor, optional, shape (*S, D)
        Initial guess of the mean system (the previous E-step's mean).
    tol : float
        Per-system relative residual at which CG stops.
    max_iters : int
        Most CG iterations.
    loglik : bool
        Also estimate the marginal log-likelihood by SLQ from the same CG runs.

    Returns
    -------
    PosteriorMoments
        ``mean`` and ``variance`` ``(*S, D)``; ``loglik`` ``(*S,)`` when asked; per-system
        ``cg_iterations`` and ``converged`` of shape ``(K+1, *S)``; all ``solutions``.
        Variances are clipped to ``[1/A_ii, 1/p_i]``, bounds every posterior variance obeys.
    """
    shape = lg.batch_shape
    rhs = lg.rhs().expand(*shape, lg.n_latent)
    diag = lg.diagonal().expand(*shape, lg.n_latent)
    probes = rademacher_probes(
        num_probes,
        (*shape, lg.n_latent),
        share_over=share_probes_over,
        generator=generator,
        dtype=rhs.dtype,
        device=rhs.device,
    )
    x0 = None
    if warm_start is not None:
        x0 = torch.zeros((num_probes + 1, *shape, lg.n_latent), dtype=rhs.dtype, device=rhs.device)
        x0[0] = warm_start
    res = probe_solve(
        lg.precision_operator,
        rhs,
        num_probes,
        M_diag=diag,
        probes=probes,
        tol=tol,
        max_iters=max_iters,
        x0=x0,
        rotate=True,
        logdet=loglik,
        grad="none",
        warn=False,
    )
    prior_var = (1.0 / lg.prior_precision).expand_as(diag)
    variance = torch.minimum(torch.maximum(res.diag, 1.0 / diag), prior_var)
    return PosteriorMoments(
        mean=res.mean,
        variance=variance,
        loglik=lg.marginal_loglik(res.mean, res.logdet) if loglik else None,
        cg_iterations=res.cg.iterations,
        converged=res.cg.converged,
        cg_residual=res.cg.residual,
        solutions=res.x,
    )


def cofem_estep(
    model: LatentGaussianModel,
    params: Any,
    batch: Any,
    **kwargs: Any,
) -> PosteriorMoments:
    """Covariance-free E-step of ``model`` (keyword arguments as :func:`cofem_posterior`)."""
    return cofem_posterior(model.linear_gaussian(params, batch), **kwargs)
