"""Plumbing shared by the EM-fitted estimators (SBL, CMTCS): the checks of their common
hyperparameters, the default CG tolerance, the initial noise precision, the E-step that each
``method`` stands for, and the exact ``φᵀΣφ`` their predictions need."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from probunroll.inference.cofem import cofem_posterior
from probunroll.inference.em import (
    design_rows,
    exact_posterior,
    observed_rows,
    posterior_quadratic_form,
)
from probunroll.linalg import cg
from probunroll.models import _validation as check
from probunroll.models.base import LatentGaussianModel, LinearGaussian, PosteriorMoments

METHODS = ("cofem", "em")
FORMS = ("auto", "precision", "woodbury")

EStep = Callable[[Any, PosteriorMoments | None], PosteriorMoments]


def default_cg_tol(cg_tol: float | None, dtype: torch.dtype) -> float:
    """``cg_tol`` if given, else ``max(1e-4, 1e4·eps(dtype))``: 1e-4 in float64, 1.2e-3 in
    float32, where the true residual of an SBL precision cannot be evaluated much below
    ``eps·κ``."""
    if cg_tol is not None:
        return float(cg_tol)
    return max(1e-4, 1e4 * torch.finfo(dtype).eps)


def observed_variance(y: Tensor, mask: Tensor | None, dims: tuple[int, ...]) -> Tensor:
    """Variance of the observed entries of ``y`` over ``dims``, floored away from zero."""
    mask = torch.ones_like(y) if mask is None else mask
    count = mask.sum(dims, keepdim=True)
    mean = (mask * y).sum(dims, keepdim=True) / count
    centred = mask * (y - mean)
    var = ((centred * centred).sum(dims, keepdim=True) / count).squeeze(dims)
    return var.clamp_min(torch.finfo(var.dtype).tiny)


class EMEstimator:
    """Mixin of the estimators fitted by exact EM (``method="em"``) or CoFEM (``"cofem"``).

    Expects the attributes ``method``, ``em_form``, ``num_probes``, ``max_iter``, ``tol``,
    ``max_cg_iter``, ``cg_tol``, ``noise_precision``, ``noise_precision_init`` and
    ``alpha_init`` (set by the subclass's ``__init__``); the prediction helpers also expect
    the fitted ``operator_``.
    """

    def _check_em_hyperparameters(self) -> None:
        check.check_choice("method", self.method, METHODS)
        check.check_choice("em_form", self.em_form, FORMS)
        check.check_int("num_probes", self.num_probes)
        check.check_int("max_iter", self.max_iter)
        check.check_positive("tol", self.tol)
        check.check_int("max_cg_iter", self.max_cg_iter)
        check.check_positive("noise_precision", self.noise_precision)
        check.check_positive("noise_precision_init", self.noise_precision_init)
        check.check_positive("alpha_init", self.alpha_init)
        check.check_positive("cg_tol", self.cg_tol)

    def _initial_noise_precision(
        self, y: Tensor, mask: Tensor | None, dims: tuple[int, ...], shape: Sequence[int]
    ) -> Tensor:
        """The fixed ``noise_precision``, else ``noise_precision_init``, else ``10 / var(y)``
        (σ² = 10% of the observed data variance over ``dims``), reshaped to ``shape``."""
        value = self.noise_precision
        if value is None:
            value = self.noise_precision_init
        if value is not None:
            return torch.full(tuple(shape), float(value), dtype=y.dtype, device=y.device)
        return (10.0 / observed_variance(y, mask, dims)).reshape(tuple(shape))

    def _make_estep(
        self,
        model: LatentGaussianModel,
        batch: Any,
        params: Any,
        generator: torch.Generator,
        share_probes_over: Sequence[int] = (),
    ) -> EStep:
        """The E-step of ``self.method``: exact (the design's observed rows gathered once) or
        covariance-free (probes from ``generator``, the mean warm-started from the last
        E-step)."""
        if self.method == "em":
            rows = observed_rows(model.linear_gaussian(params, batch))
            return lambda p, _prev: exact_posterior(
                model.linear_gaussian(p, batch), form=self.em_form, rows=rows
            )
        tol = default_cg_tol(self.cg_tol, batch.y.dtype)

        def estep(p: Any, prev: PosteriorMoments | None) -> PosteriorMoments:
            return cofem_posterior(
                model.linear_gaussian(p, batch),
                num_probes=self.num_probes,
                generator=generator,
                share_probes_over=share_probes_over,
                warm_start=None if prev is None else prev.mean,
                tol=tol,
                max_iters=self.max_cg_iter,
            )

        return estep

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit first")

    def _prediction_operator(self, Phi: Any, coef: Tensor) -> Any:
        """``Phi`` as an operator in ``coef``'s dtype and device, checked against the fitted
        number of coefficients; ``None``: the fitted ``operator_``."""
        if Phi is None:
            return self.operator_
        op = check.resolve_operator("Phi", Phi, coef.dtype, coef.device)
        n_latent = int(coef.shape[-1])
        if int(op.shape[1]) != n_latent:
            raise ValueError(
                f"Phi has {int(op.shape[1])} columns but the model was fitted with "
                f"{n_latent} coefficients"
            )
        return op

    def _posterior_quadratic_forms(
        self, lg: LinearGaussian, op: Any, budget: int = 1 << 24
    ) -> Tensor:
        """``φ_jᵀ Σ φ_j`` for every row ``φ_j`` of ``op`` (M, D) and every posterior of ``lg``
        (batch shape ``S``): shape ``(*S, M)``.

        Exact by one Cholesky factor (``em``:
        :func:`~probunroll.inference.em.posterior_quadratic_form`) or by one
        Jacobi-preconditioned CG solve ``Aξ = φ_j`` per row and posterior to
        ``cg_tol`` (``cofem``; ``φ_jᵀξ`` errs by ``rᵀA⁻¹r``, second order in the residual).
        The rows go in blocks whose work (``(block, *S, D)`` for CG) stays under ``budget``
        elements.
        """
        dtype, device = lg.target.dtype, lg.target.device
        rows = design_rows(op, torch.arange(int(op.shape[0]), device=device), dtype, device)
        if self.method == "em":
            return posterior_quadratic_form(lg, rows, form=self.em_form, budget=budget)
        shape = lg.batch_shape
        size = max(1, budget // max(1, shape.numel() * lg.n_latent))
        out = []
        for block in rows.split(size):
            rhs = block.reshape(block.shape[0], *([1] * len(shape)), lg.n_latent)
            rhs = rhs.expand(block.shape[0], *shape, lg.n_latent)
            res = cg(
                lg.precision_operator,
                rhs,
                M_inv=1.0 / lg.diagonal(),
                tol=default_cg_tol(self.cg_tol, dtype),
                max_iters=self.max_cg_iter,
                grad="none",
            )
            out.append((rhs * res.x).sum(-1).movedim(0, -1))
        return torch.cat(out, dim=-1)
