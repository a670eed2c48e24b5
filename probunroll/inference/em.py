"""Exact E-step of a latent Gaussian model: the baseline every covariance-free method is
compared against, so it is the best exact method, not a strawman.

Two exact forms of the same posterior, batched over data points / tasks / clusters, with no
explicit inverse anywhere:

``"precision"`` (``D × D``)
    Cholesky of the posterior precision :math:`A = P + \\tilde\\Phi^\\top\\tilde\\Phi` with
    :math:`\\tilde\\Phi = (\\Omega\\Psi)^{1/2}\\Phi`; :math:`O(D^3)` time and :math:`O(D^2)` memory
    per batch entry. This is the form of the research code (baseline (a) of the benchmarks).

``"woodbury"`` (``M × M``, ``M`` = observed entries)
    Cholesky of :math:`C = I_M + \\tilde\\Phi P^{-1}\\tilde\\Phi^\\top`, by the Woodbury identity

    .. math::

        \\Sigma = P^{-1} - P^{-1}\\tilde\\Phi^\\top C^{-1}\\tilde\\Phi P^{-1},\\qquad
        \\mu = P^{-1}\\tilde\\Phi^\\top C^{-1} (\\Omega\\Psi)^{1/2}\\tilde y,\\qquad
        \\log\\det A = \\log\\det P + \\log\\det C,

    :math:`O(M^2 D)` time. ``"auto"`` picks it when ``M < D``.

Both forms first gather the observed rows of each batch entry (padding to the largest count
with zero-weight rows, which contribute identity rows to :math:`C` and nothing to :math:`A`), so
a masked square operator costs what a row-subsampled one does. The posterior variances are the
squared column norms of :math:`L^{-1}` (precision form) or :math:`P^{-1}` minus those of
:math:`L^{-1}\\tilde\\Phi P^{-1}` (Woodbury form); a triangular solve, not an inverse.

References
----------
.. [1] M. E. Tipping, "Sparse Bayesian learning and the relevance vector machine", JMLR 2001.
.. [2] A. Lin, A. H. Song, B. Bilgic, D. Ba, "Covariance-free sparse Bayesian learning",
   IEEE TSP 2022 (arXiv:2105.10439).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from probunroll.models.base import (
    LatentGaussianModel,
    LinearGaussian,
    PosteriorMoments,
    add_prior_diagonal,
)

Form = Literal["auto", "precision", "woodbury"]
_FORMS = ("auto", "precision", "woodbury")


@dataclass(frozen=True)
class ObservedRows:
    """The dense design restricted to each batch entry's observed rows.

    Depends only on the design and the mask, so it is computed once per fit and reused by
    every E-step. ``phi`` has shape ``(*S_m, M, D)`` (or ``(N, D)`` without a mask) and
    ``order`` ``(*S_m, M)`` indexes the observed entries (``None`` without a mask), ``M`` the
    largest number of observed entries over the batch; rows past a batch entry's count are
    padding and get weight zero.
    """

    phi: Tensor
    order: Tensor | None

    def gather(self, t: Tensor) -> Tensor:
        """The observed entries of ``t`` ``(*S, N)``, shape ``(*S, M)``."""
        if self.order is None:
            return t
        shape = torch.broadcast_shapes(t.shape[:-1], self.order.shape[:-1])
        order = self.order.expand(*shape, self.order.shape[-1])
        return t.expand(*shape, t.shape[-1]).gather(-1, order)


def design_rows(
    design: Any, index: Tensor, dtype: torch.dtype, device: torch.device, chunk: int = 256
) -> Tensor:
    """Rows ``index`` of the operator ``Φ`` as a dense ``(len(index), D)`` tensor.

    Row ``j`` is ``Φᵀ e_j``: the adjoint applied to unit vectors, ``chunk`` at a time, so a
    structured operator is never materialised whole (its full ``to_dense`` peaks at several
    ``N × D`` temporaries).
    """
    n = int(design.shape[0])
    blocks = []
    for start in range(0, index.numel(), chunk):
        idx = index[start : start + chunk]
        unit = torch.zeros(idx.numel(), n, dtype=dtype, device=device)
        unit[torch.arange(idx.numel(), device=device), idx] = 1.0
        blocks.append(design.T(unit))
    return torch.cat(blocks)


def observed_rows(lg: LinearGaussian) -> ObservedRows:
    """Gather each batch entry's observed rows of the design (materialising only rows that
    some entry observes)."""
    dtype, device = lg.target.dtype, lg.target.device
    if lg.mask is None:
        index = torch.arange(lg.n_data, device=device)
        return ObservedRows(phi=design_rows(lg.design, index, dtype, device), order=None)
    observed = lg.mask > 0
    used = torch.nonzero(observed.reshape(-1, lg.n_data).any(0)).flatten()
    phi_used = design_rows(lg.design, used, dtype, device)
    position = torch.zeros(lg.n_data, dtype=torch.long, device=device)
    position[used] = torch.arange(used.numel(), device=device)
    m = int(observed.sum(-1).max())
    order = torch.argsort(observed.to(torch.int8), dim=-1, descending=True, stable=True)[..., :m]
    return ObservedRows(phi=phi_used[position[order]], order=order)


def _pieces(lg: LinearGaussian, rows: ObservedRows | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(phi, w, t)``: observed rows, their weights ``ω ψ`` and targets, batch-broadcast."""
    rows = observed_rows(lg) if rows is None else rows
    n = lg.n_data
    shape = torch.broadcast_shapes(lg.weights.shape[:-1], lg.target.shape[:-1])
    w = rows.gather(lg.weights.expand(*shape, n))
    t = rows.gather(lg.target.expand(*shape, n))
    return rows.phi, w, t


def _precision_factor(lg: LinearGaussian, phi: Tensor, w: Tensor) -> Tensor:
    """Cholesky factor ``L`` of ``A = P + Φᵀ diag(w) Φ``, shape ``(*S, D, D)``."""
    gram = phi.mT @ (w.unsqueeze(-1) * phi)
    return torch.linalg.cholesky(add_prior_diagonal(gram, lg.prior_precision))


def _woodbury_factor(lg: LinearGaussian, phi: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Φ̃, G, L_C)``: ``Φ̃ = diag(w)^{1/2}Φ`` ``(*S_d, M, D)``, ``G = Φ̃P⁻¹`` ``(*S, M, D)``
    and the Cholesky factor ``L_C`` ``(*S, M, M)`` of ``C = I + Φ̃P⁻¹Φ̃ᵀ``."""
    phi_t = w.sqrt().unsqueeze(-1) * phi
    g = phi_t * (1.0 / lg.prior_precision).unsqueeze(-2)
    cov = g @ phi_t.mT
    cov = cov + torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return phi_t, g, torch.linalg.cholesky(cov)


def _precision_form(lg: LinearGaussian, rows: ObservedRows | None) -> PosteriorMoments:
    phi, w, t = _pieces(lg, rows)
    chol = _precision_factor(lg, phi, w)
    b = (phi.mT @ (w * t).unsqueeze(-1)).squeeze(-1)
    b = b.expand(*chol.shape[:-1])
    mean = torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    variance = (chol_inv * chol_inv).sum(-2)
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return PosteriorMoments(mean=mean, variance=variance, loglik=lg.marginal_loglik(mean, logdet))


def _woodbury_form(lg: LinearGaussian, rows: ObservedRows | None) -> PosteriorMoments:
    phi, w, t = _pieces(lg, rows)
    phi_t, g, chol = _woodbury_factor(lg, phi, w)  # Φ̃, Φ̃P⁻¹, L_C
    prior_var = 1.0 / lg.prior_precision  # P⁻¹, (*S_p, D)
    ys = (w.sqrt() * t).expand(*chol.shape[:-1])
    u = torch.cholesky_solve(ys.unsqueeze(-1), chol).squeeze(-1)
    mean = prior_var * (u.unsqueeze(-2) @ phi_t).squeeze(-2)
    v = torch.linalg.solve_triangular(chol, g, upper=False)
    variance = prior_var - (v * v).sum(-2)
    # Σ_ii ≥ 1 / A_ii; the bound only bites where cancellation has eaten a tiny variance.
    floor = 1.0 / (lg.prior_precision + (w.unsqueeze(-1) * phi * phi).sum(-2))
    variance = torch.maximum(variance, floor)
    log_prior = torch.log(lg.prior_precision).expand(*variance.shape).sum(-1)
    logdet = log_prior + 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return PosteriorMoments(mean=mean, variance=variance, loglik=lg.marginal_loglik(mean, logdet))


def choose_form(lg: LinearGaussian, rows: ObservedRows | None = None) -> str:
    """The cheaper exact form: ``"woodbury"`` when fewer entries are observed than latents."""
    if rows is not None:
        m = rows.phi.shape[-2]
    elif lg.mask is None:
        m = lg.n_data
    else:
        m = int((lg.mask > 0).sum(-1).max())
    return "woodbury" if m < lg.n_latent else "precision"


def exact_posterior(
    lg: LinearGaussian, form: Form = "auto", rows: ObservedRows | None = None
) -> PosteriorMoments:
    """Exact posterior means, variances and marginal log-likelihoods of a batch.

    Parameters
    ----------
    lg : LinearGaussian
        The batch of posteriors, ``A = diag(p) + Φᵀ diag(ω ψ) Φ``, batch shape ``S``.
    form : {"auto", "precision", "woodbury"}
        ``"precision"`` factorises the ``D × D`` precision, ``"woodbury"`` the ``M × M``
        matrix ``I + Φ̃P⁻¹Φ̃ᵀ`` over the ``M`` observed entries; ``"auto"`` takes the cheaper.
    rows : ObservedRows, optional
        :func:`observed_rows` of ``lg``, precomputed (it does not change across EM iterations).

    Returns
    -------
    PosteriorMoments
        ``mean`` and ``variance`` of shape ``(*S, D)``, exact ``loglik`` of shape ``(*S,)``.
    """
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
    if form == "auto":
        form = choose_form(lg, rows)
    return _precision_form(lg, rows) if form == "precision" else _woodbury_form(lg, rows)


def em_estep(
    model: LatentGaussianModel, params: Any, batch: Any, form: Form = "auto"
) -> PosteriorMoments:
    """Exact E-step of ``model`` at ``params`` on ``batch`` (see :func:`exact_posterior`)."""
    return exact_posterior(model.linear_gaussian(params, batch), form=form)


def posterior_quadratic_form(
    lg: LinearGaussian,
    vectors: Tensor,
    form: Form = "auto",
    rows: ObservedRows | None = None,
    budget: int = 1 << 24,
) -> Tensor:
    """Exact ``vᵀ Σ v = vᵀ A⁻¹ v`` for every row ``v`` of ``vectors`` and every batch entry.

    The posterior variance of a linear functional ``vᵀz`` (a new row of the design: a
    predictive variance without its noise term). ``"precision"``: ``‖L⁻¹v‖²`` with
    ``A = LLᵀ``; ``"woodbury"``: ``vᵀP⁻¹v − ‖L_C⁻¹Φ̃P⁻¹v‖²`` with ``C = L_C L_Cᵀ`` as in
    :func:`exact_posterior`; ``"auto"`` takes the cheaper. No inverse is formed; the factor
    is computed once and the vectors are solved in blocks whose ``(*S, ·, block)`` solutions
    stay under ``budget`` elements.

    Parameters
    ----------
    lg : LinearGaussian
        The batch of posteriors, batch shape ``S``, latent dimension ``D``.
    vectors : Tensor, shape (M, D)
        The functionals.
    form, rows
        As in :func:`exact_posterior`.
    budget : int
        Most elements of one block's triangular-solve result.

    Returns
    -------
    Tensor, shape (*S, M)
    """
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
    if form == "auto":
        form = choose_form(lg, rows)
    phi, w, _ = _pieces(lg, rows)
    if form == "precision":
        chol = _precision_factor(lg, phi, w)

        def block_form(v_t: Tensor) -> Tensor:
            z = torch.linalg.solve_triangular(
                chol, v_t.expand(*chol.shape[:-1], v_t.shape[-1]), upper=False
            )
            return (z * z).sum(-2)

    else:
        _, g, chol = _woodbury_factor(lg, phi, w)
        prior_var = 1.0 / lg.prior_precision  # (*S_p, D)

        def block_form(v_t: Tensor) -> Tensor:
            u = torch.linalg.solve_triangular(chol, g @ v_t, upper=False)  # (*S, M_o, m)
            prior_part = prior_var @ (v_t * v_t)  # (*S_p, m)
            # vᵀA⁻¹v ≥ (vᵀv)² / vᵀAv (Cauchy–Schwarz in the A inner product); the bound only
            # bites where cancellation has eaten a tiny quadratic form.
            energy = lg.prior_precision @ (v_t * v_t) + (w.unsqueeze(-1) * (phi @ v_t) ** 2).sum(-2)
            floor = (v_t * v_t).sum(0) ** 2 / energy
            return torch.maximum(prior_part - (u * u).sum(-2), floor)

    size = max(1, budget // max(1, chol.shape[:-1].numel()))
    return torch.cat([block_form(block.mT) for block in vectors.split(size)], dim=-1)
