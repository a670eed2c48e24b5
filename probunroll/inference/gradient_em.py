"""Gradient EM: exact posteriors and the Fisher-identity gradient, stepped by an optimizer.

The baseline of probabilistic unrolling (Lin, Tolooshams, Atchadé & Ba, ICML 2023,
arXiv:2306.03249). For a latent Gaussian model with posterior precision ``A_θ`` and complete
log-likelihood ``log p_θ(ỹ, z) = −½ zᵀA_θz + b_θᵀz + c_θ``, the Fisher identity gives

.. math::

    \\nabla_\\theta \\log p_\\theta(\\tilde y)
      = \\mathbb E_{p_\\theta(z\\mid\\tilde y)}[\\nabla_\\theta \\log p_\\theta(\\tilde y, z)]
      = \\partial_\\theta \\log p_\\theta(\\tilde y, z)\\big|_{z=\\mu}
        - \\tfrac12 \\operatorname{tr}(\\Sigma\\, \\partial_\\theta A_\\theta),

which is the gradient at the current θ of EM's Q function
``Q(θ') = log p_θ'(ỹ, μ) − ½ tr(Σ A_θ')`` with ``μ, Σ`` held fixed. Autograd of Q therefore gives
the exact gradient; the cost is one exact posterior (a batched Cholesky) per data point.

Talks to the model only through the model interface: ``exact_posterior`` and
``expected_complete_loglik`` when the model has them (FA uses its Woodbury form when it is
cheaper), otherwise the generic :func:`dense_posterior` below, which densifies
``precision_operator``, factors it and uses ``Σ = CCᵀ`` with ``C = L⁻ᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from probunroll.inference.stochastic import fit_stochastic
from probunroll.models.base import check_model_methods

__all__ = ["DensePosterior", "dense_posterior", "fisher_objective", "fit_gradient_em"]

Params = dict[str, Tensor]


@dataclass(frozen=True)
class DensePosterior:
    """Exact posterior from a dense Cholesky ``A = LLᵀ``.

    Attributes
    ----------
    mean : Tensor (B, D)
        ``μ = A⁻¹b``.
    sqrt_cov : Tensor (B, D, D)
        ``C = L⁻ᵀ``, so that ``Σ = CCᵀ``; its columns act as "exact samples" in the trace term.
    logdet : Tensor (B,)
        ``log det A``.
    """

    mean: Tensor
    sqrt_cov: Tensor
    logdet: Tensor


def dense_posterior(model: Any, params: Params, batch: tuple[Tensor, ...]) -> DensePosterior:
    """Generic exact posterior: ``A`` densified from ``model.precision_operator`` (D matvecs),
    one batched Cholesky, ``μ = A⁻¹b`` and ``C = L⁻ᵀ``. O(D·matvec + D³) per point."""
    b = model.rhs(params, batch)
    D = b.shape[-1]
    apply = model.precision_operator(params, batch)
    eye = torch.eye(D, dtype=b.dtype, device=b.device)
    cols = apply(eye.reshape(D, *([1] * (b.ndim - 1)), D).expand(D, *b.shape))  # (D, B, D)
    A = torch.movedim(cols, 0, -1)  # (B, D, D), column k = A e_k
    L = torch.linalg.cholesky(0.5 * (A + A.mT))
    mean = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    eye_b = eye.expand_as(L)
    sqrt_cov = torch.linalg.solve_triangular(L.mT, eye_b, upper=True)
    logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return DensePosterior(mean=mean, sqrt_cov=sqrt_cov, logdet=logdet)


def _dense_q(model: Any, params: Params, batch: tuple[Tensor, ...], post: DensePosterior):
    """``Q_n(θ) = log p_θ(ỹ_n, μ_n) − ½ Σ_k c_kᵀ A_θ c_k`` with ``C = [c_1..c_D]``."""
    cols = torch.movedim(post.sqrt_cov, -1, 0)  # (D, B, D), column k of C
    quad = (cols * model.precision_operator(params, batch)(cols)).sum(-1).sum(0)
    return model.complete_loglik(params, batch, post.mean) - 0.5 * quad


def _has_exact_posterior(model: Any) -> bool:
    """Whether the model forms its own exact posterior (``exact_posterior`` and
    ``expected_complete_loglik``); otherwise :func:`dense_posterior` densifies ``A``."""
    return callable(getattr(model, "exact_posterior", None)) and callable(
        getattr(model, "expected_complete_loglik", None)
    )


def fisher_objective(
    model: Any, params: Params, batch: tuple[Tensor, ...], generator: torch.Generator | None = None
) -> tuple[Tensor, dict]:
    """Mean over the batch of EM's Q function at the current posterior.

    Its gradient is exactly ``mean_n ∇θ log p_θ(ỹ_n)`` (Fisher identity). ``generator`` is
    unused (the gradient is exact); it keeps the signature of the unrolled objective. A model
    with ``update_local(params, batch, mean, var)`` gets the exact means and ``diag Σ`` after
    Q is formed (per-data-point hyperparameters, e.g. SBL's prior precisions).
    """
    with torch.no_grad():
        frozen = {k: v.detach() for k, v in params.items()}
        if _has_exact_posterior(model):
            post = model.exact_posterior(frozen, batch)
            q = model.expected_complete_loglik
        else:
            post = dense_posterior(model, frozen, batch)
            q = lambda p, b, s: _dense_q(model, p, b, s)  # noqa: E731
    value = q(params, batch, post).mean()
    if hasattr(model, "update_local"):  # per-point hyperparameters: EM step from diag Σ
        with torch.no_grad():
            if isinstance(post, DensePosterior):
                var = post.sqrt_cov.square().sum(-1)
            elif hasattr(post, "var"):  # the posterior carries diag Σ (no D×D matrix)
                var = post.var
            else:
                var = post.covariance().diagonal(dim1=-2, dim2=-1)
            model.update_local(frozen, batch, post.mean, var)
    return value, {}


def fit_gradient_em(
    model: Any, params: Params, data: tuple[Tensor, ...], **loop: Any
) -> tuple[Params, list[dict[str, Any]]]:
    """Fit by gradient EM: exact Fisher-identity gradients, minibatches, a torch optimizer.

    ``loop`` goes to :func:`probunroll.inference.stochastic.fit_stochastic` (``batch_size``,
    ``max_epochs``, ``optimizer``, ``lr``, ``lr_schedule``, ``monitor``, ``tol``, ``patience``,
    ``generator``, ``progress``).

    References
    ----------
    Lin, Tolooshams, Atchadé & Ba, ICML 2023, arXiv:2306.03249 (gradient EM baseline).
    Balakrishnan, Wainwright & Yu, "Statistical guarantees for the EM algorithm", 2017.
    """
    if not _has_exact_posterior(model):  # the generic dense E-step
        check_model_methods(
            model, "fit_gradient_em", ("precision_operator", "rhs", "complete_loglik")
        )
    objective = lambda p, b, g: fisher_objective(model, p, b, g)  # noqa: E731
    loop.setdefault("desc", "gradient EM")
    return fit_stochastic(objective, params, data, **loop)
