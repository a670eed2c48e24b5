"""The latent Gaussian model interface shared by every model and inference method.

A latent Gaussian model (LGM) for a batch of data points (or tasks) has, per batch entry,

.. math::

    z \\sim \\mathcal N(0, P^{-1}),\\qquad
    \\tilde y \\mid z \\sim \\mathcal N(\\Phi z, \\Psi^{-1}) \\text{ on } \\Omega,

with a diagonal prior precision :math:`P = \\operatorname{diag}(p)` and diagonal noise precision
:math:`\\Psi = \\operatorname{diag}(\\psi)`. Its posterior is Gaussian with

.. math::

    A = P + \\Phi^\\top \\Omega \\Psi \\Phi,\\qquad b = \\Phi^\\top \\Omega \\Psi \\tilde y,\\qquad
    \\mu = A^{-1} b,\\qquad \\Sigma = A^{-1}.

:class:`LinearGaussian` holds these pieces for one batch (shapes ``(*S, D)`` for the latent,
``(*S, N)`` for the data, any of them broadcastable) and derives from them everything the
inference methods need: the matrix-free precision operator, the right-hand side, perturbations
with covariance ``A``, the exact diagonal of ``A``, the complete-data log-likelihood and the
marginal log-likelihood from a mean and a log-determinant.

:class:`LatentGaussianModel` is the interface of ``shared/DESIGN.md``: a model maps its
parameters and a batch of data to a :class:`LinearGaussian` and supplies a closed-form M-step;
inference methods (``probunroll.inference``) only talk to it through these methods.

References
----------
.. [1] A. Lin, B. Tolooshams, Y. Atchadé, D. Ba, "Probabilistic unrolling: scalable, inverse-free
   maximum likelihood estimation for latent Gaussian models", ICML 2023.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from probunroll.linalg import gaussian_perturbation

_LOG_2PI = math.log(2.0 * math.pi)


def add_prior_diagonal(gram: Tensor, prior_precision: Tensor) -> Tensor:
    """``gram + diag(p)`` with the batch dimensions of both broadcast: ``(*S, D, D)``."""
    prior = prior_precision.expand(torch.broadcast_shapes(gram.shape[:-1], prior_precision.shape))
    return gram + torch.diag_embed(prior)


@dataclass(frozen=True)
class LinearGaussian:
    """Prior, likelihood and data of a batch of linear Gaussian posteriors.

    Parameters
    ----------
    prior_precision : Tensor, shape (*S, D)
        Diagonal prior precision ``p`` (broadcastable to the batch shape ``S``).
    design : operator, shape (N, D)
        The forward operator ``Φ`` (a ``probunroll.operators`` operator), shared by the batch.
    noise_precision : Tensor, shape (*S, N)
        Noise precision ``ψ`` (broadcastable; a 0-d tensor for a scalar precision).
    target : Tensor, shape (*S, N)
        Observed data ``ỹ`` (minus any mean); the entries outside the mask are ignored.
    mask : Tensor or None, shape (*S, N)
        Observation mask ``ω`` (``1`` observed, ``0`` missing); ``None`` means fully observed.
    """

    prior_precision: Tensor
    design: Any
    noise_precision: Tensor
    target: Tensor
    mask: Tensor | None = None

    @property
    def weights(self) -> Tensor:
        """``ω ⊙ ψ``, the effective per-entry noise precision, shape ``(*S, N)``."""
        psi = self.noise_precision
        return psi if self.mask is None else self.mask * psi

    @property
    def batch_shape(self) -> torch.Size:
        """The batch shape ``S`` of the posterior (broadcast of all pieces)."""
        return torch.broadcast_shapes(
            self.prior_precision.shape[:-1], self.weights.shape[:-1], self.target.shape[:-1]
        )

    def precision_operator(self, x: Tensor) -> Tensor:
        """Apply ``A = diag(p) + Φᵀ diag(ω ψ) Φ`` to ``x`` of shape ``(..., *S, D)``."""
        return self.prior_precision * x + self.design.T(self.weights * self.design(x))

    def rhs(self) -> Tensor:
        """The posterior-mean right-hand side ``b = Φᵀ(ω ⊙ ψ ⊙ ỹ)``, shape ``(*S, D)``."""
        return self.design.T(self.weights * self.target)

    def diagonal(self) -> Tensor:
        """The exact diagonal of ``A``: ``p + diag(Φᵀ diag(ω ψ) Φ)``, shape ``(*S, D)``."""
        weights = self.weights
        if weights.dim() == 0:
            gram = weights * self.design.gram_diagonal()
        else:
            gram = self.design.gram_diagonal(weights.expand(*weights.shape[:-1], self.n_data))
        return self.prior_precision + gram

    @property
    def n_data(self) -> int:
        """Number of rows ``N`` of the design."""
        return int(self.design.shape[0])

    @property
    def n_latent(self) -> int:
        """Number of columns ``D`` of the design."""
        return int(self.design.shape[1])

    def perturbation(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``ε = p^{1/2} ⊙ u + Φᵀ Ω Ψ^{1/2} v`` with ``Cov(ε) = A``, shape ``(K, *S, D)``.

        ``A⁻¹ε`` is then a posterior sample (perturb and solve); see
        :func:`probunroll.linalg.gaussian_perturbation`.
        """
        shape = self.batch_shape
        prior = self.prior_precision.expand(*shape, self.n_latent)
        return gaussian_perturbation(
            prior,
            self.design,
            self.noise_precision,
            num_samples,
            mask=self.mask,
            generator=generator,
        )

    def n_observed(self) -> Tensor:
        """``|Ω|`` per batch entry, shape ``(*S',)`` (broadcastable to ``S``)."""
        if self.mask is None:
            return torch.full((), self.n_data, dtype=self.target.dtype, device=self.target.device)
        return self.mask.to(self.target.dtype).sum(-1)

    def _log_noise_term(self) -> Tensor:
        """``½ Σ_{j∈Ω} log ψ_j − |Ω|/2 log 2π``."""
        log_psi = torch.log(self.noise_precision)
        if self.mask is None:
            total = log_psi.expand(*log_psi.shape[:-1], self.n_data).sum(-1)
        else:
            total = (self.mask * log_psi).sum(-1)
        return 0.5 * total - 0.5 * _LOG_2PI * self.n_observed()

    def residual_sq(self, z: Tensor) -> Tensor:
        """``(ỹ − Φz)ᵀ Ω Ψ (ỹ − Φz)`` per batch entry."""
        r = self.target - self.design(z)
        return (self.weights * r * r).sum(-1)

    def complete_loglik(self, z: Tensor) -> Tensor:
        """``log p(ỹ, z) = log N(z; 0, P⁻¹) + Σ_{j∈Ω} log N(ỹ_j; (Φz)_j, 1/ψ_j)``.

        ``z`` has shape ``(..., *S, D)``; returns ``(..., *S)``. Differentiable in every field.
        """
        p = self.prior_precision
        log_prior = 0.5 * (torch.log(p) - _LOG_2PI - p * z * z).sum(-1)
        return log_prior - 0.5 * self.residual_sq(z) + self._log_noise_term()

    def marginal_loglik(self, mean: Tensor, logdet: Tensor) -> Tensor:
        """Marginal ``log p(ỹ)`` from the posterior mean and ``log det A`` (§A of the brief).

        .. math::

            \\log p(\\tilde y) = -\\tfrac12 \\|\\tilde y - \\Phi\\mu\\|^2_{\\Omega\\Psi}
            - \\tfrac12 \\mu^\\top P \\mu - \\tfrac12 \\log\\det A + \\tfrac12 \\log\\det P
            + \\tfrac12 \\sum_{j\\in\\Omega} \\log\\psi_j - \\tfrac{|\\Omega|}{2}\\log 2\\pi.

        With an approximate ``μ`` the quadratic part is second-order accurate (``μ`` maximises
        it). Returns shape ``(*S,)``.
        """
        p = self.prior_precision
        quad = self.residual_sq(mean) + (p * mean * mean).sum(-1)
        log_p = torch.log(p).expand(*p.shape[:-1], self.n_latent).sum(-1)
        return -0.5 * quad - 0.5 * logdet + 0.5 * log_p + self._log_noise_term()

    def dense_precision(self) -> Tensor:
        """The dense ``A``, shape ``(*S, D, D)``, for tests and small problems."""
        phi = self.design.to_dense(dtype=self.target.dtype, device=self.target.device)
        return add_prior_diagonal(phi.mT @ (self.weights.unsqueeze(-1) * phi), self.prior_precision)

    def exact_loglik(self) -> Tensor:
        """Exact marginal ``log p(ỹ)`` by a dense Cholesky of ``A``, shape ``(*S,)``."""
        chol = torch.linalg.cholesky(self.dense_precision())
        mean = torch.cholesky_solve(self.rhs().unsqueeze(-1), chol).squeeze(-1)
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return self.marginal_loglik(mean, logdet)


@dataclass(frozen=True)
class PosteriorMoments:
    """What an E-step returns and an M-step consumes.

    Attributes
    ----------
    mean : Tensor, shape (*S, D)
        Posterior means ``μ``.
    variance : Tensor, shape (*S, D)
        Posterior variances ``diag Σ`` (exact, or an unbiased probe estimate).
    loglik : Tensor or None, shape (*S,)
        Marginal log-likelihood per batch entry (exact, or by stochastic Lanczos quadrature).
    cg_iterations : Tensor or None
        CG iterations per solved system (covariance-free E-steps only).
    converged : Tensor or None
        Per-system convergence flags (covariance-free E-steps only).
    cg_residual : Tensor or None
        Per-system final relative residuals (covariance-free E-steps only).
    solutions : Tensor or None
        All CG solutions ``(K+1, *S, D)``, kept to warm-start the next E-step.
    """

    mean: Tensor
    variance: Tensor
    loglik: Tensor | None = None
    cg_iterations: Tensor | None = None
    converged: Tensor | None = None
    cg_residual: Tensor | None = None
    solutions: Tensor | None = None


class LatentGaussianModel(ABC):
    """Interface of a latent Gaussian model (``shared/DESIGN.md``, "The model interface").

    Subclasses implement :meth:`linear_gaussian` (parameters and a batch to the posterior's
    pieces) and :meth:`m_step`; the remaining methods of the interface are derived from the
    :class:`LinearGaussian` and are what inference methods call.
    """

    @abstractmethod
    def linear_gaussian(self, params: Any, batch: Any) -> LinearGaussian:
        """The prior, likelihood and data of the posterior for ``batch`` under ``params``."""

    @abstractmethod
    def m_step(self, params: Any, batch: Any, stats: PosteriorMoments) -> Any:
        """Closed-form parameter update from the E-step's posterior moments."""

    def precision_operator(self, params: Any, batch: Any) -> Callable[[Tensor], Tensor]:
        """``A_θ = P_θ + Φᵀ Ω Ψ Φ`` as a callable on ``(..., *S, D)``."""
        return self.linear_gaussian(params, batch).precision_operator

    def rhs(self, params: Any, batch: Any) -> Tensor:
        """``b = Φᵀ Ω Ψ ỹ``, so that the posterior mean is ``A⁻¹ b``."""
        return self.linear_gaussian(params, batch).rhs()

    def perturbation(
        self, params: Any, batch: Any, generator: torch.Generator | None, num_samples: int
    ) -> Tensor:
        """``ε`` with ``Cov(ε) = A``, shape ``(num_samples, *S, D)``."""
        return self.linear_gaussian(params, batch).perturbation(num_samples, generator)

    def preconditioner_diag(self, params: Any, batch: Any) -> Tensor:
        """The exact diagonal of ``A`` (Jacobi preconditioner), from exact masked Gram diagonals."""
        return self.linear_gaussian(params, batch).diagonal()

    def complete_loglik(self, params: Any, batch: Any, z: Tensor) -> Tensor:
        """``log p_θ(ỹ, z)``, differentiable in ``θ``."""
        return self.linear_gaussian(params, batch).complete_loglik(z)

    def exact_loglik(self, params: Any, batch: Any) -> Tensor:
        """Exact marginal ``log p_θ(ỹ)`` by a dense Cholesky (tests and small problems)."""
        return self.linear_gaussian(params, batch).exact_loglik()


@runtime_checkable
class StochasticModel(Protocol):
    """What :func:`probunroll.inference.fit_unrolled` and
    :func:`probunroll.inference.fit_gradient_em` need of a model: the five methods of the
    interface that act on a minibatch with differentiable parameters ``params`` (a dict of
    tensors). :class:`LatentGaussianModel` subclasses have them; models whose parameters are
    unconstrained tensors (``FactorAnalysisModel``, ``SBLDictionaryModel``) implement them
    directly. Optional hooks, used when present: ``preconditioner`` (a shared ``M⁻¹`` for
    ``preconditioner="shared"``), ``update_local`` (per-data-point hyperparameters such as
    SBL's α, given the posterior means and ``diag Σ``), ``initial_mean`` (warm starts),
    ``exact_posterior`` with ``expected_complete_loglik`` (a cheaper exact E-step for
    gradient EM than densifying ``A``).
    """

    def precision_operator(self, params: Any, batch: Any) -> Callable[[Tensor], Tensor]: ...

    def rhs(self, params: Any, batch: Any) -> Tensor: ...

    def perturbation(
        self, params: Any, batch: Any, generator: torch.Generator | None, num_samples: int
    ) -> Tensor: ...

    def preconditioner_diag(self, params: Any, batch: Any) -> Tensor: ...

    def complete_loglik(self, params: Any, batch: Any, z: Tensor) -> Tensor: ...


#: The methods every stochastic fit (``unrolled``, ``gradient_em``) calls on a model, in
#: the protocol's order: read off :class:`StochasticModel` so the two cannot drift apart.
STOCHASTIC_INTERFACE: tuple[str, ...] = tuple(
    name
    for name, value in vars(StochasticModel).items()
    if callable(value) and not name.startswith("_")
)


def check_model_methods(
    model: object, method: str, names: tuple[str, ...] = STOCHASTIC_INTERFACE
) -> None:
    """Raise ``TypeError`` naming the missing ones unless ``model`` has every method in
    ``names`` (callable), so a fit fails before it starts rather than inside its first
    minibatch. ``method`` names the caller in the message."""
    missing = [m for m in names if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"{method} needs a model with {', '.join(names)} (the latent Gaussian model "
            f"interface); {type(model).__name__} lacks {', '.join(missing)}"
        )
