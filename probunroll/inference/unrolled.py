"""Probabilistic unrolling: gradients of a latent Gaussian model's marginal log-likelihood from
Monte Carlo posterior samples and an unrolled, differentiable CG solver.

For each data point the model defines the posterior precision ``A_θ`` and the right-hand sides
``B_θ = [b_θ, ε̄_1..ε̄_K]``, where ``ε̄_k`` are perturbations with ``Cov(ε̄) = A_θ`` drawn fresh at
the current θ and detached (perturb-and-solve). ``I`` steps of preconditioned CG give the
posterior mean ``μ^{(I)} ≈ A⁻¹b`` and samples ``σ_k^{(I)} ≈ A⁻¹ε̄_k ~ N(0, Σ)``. The target is the
Fisher-identity gradient

.. math::

    g = \\partial_\\theta \\log p_\\theta(\\tilde y, z)\\big|_{z=\\mu}
        - \\tfrac12 \\operatorname{tr}(\\Sigma\\, \\partial_\\theta A_\\theta).

Two surrogates turn the solver outputs into estimates of g (``reference/unrolling.md`` §C):

- **output gradient** (solver outputs held constant):
  ``L_OG(θ) = log p_θ(ỹ, sg μ) − (1/2K) Σ_k sg σ_kᵀ A_θ sg σ_k``; unbiased as I → ∞, error
  O(solver error).
- **network gradient** (backpropagate through the I solver steps):
  ``L_NG(θ) = log p_θ(ỹ, μ^{(I)}_θ) + (1/K) Σ_k [σ_kᵀ ε̄_k − ½ σ_kᵀ A_θ σ_k]`` with
  ``σ_k = σ_{k,θ}^{(I)}`` the unrolled outputs.
  Its derivatives with respect to the solver outputs vanish at the exact solution
  (``b − Aμ = 0``, ``ε̄_k − Aσ_k = 0``), so solver error enters the gradient only at second
  order: the network-gradient error is about the square of the output-gradient error.

The trap: naive autodiff of ``(1/K) Σ_k log p_θ(ỹ, μ^{(I)} + σ_k^{(I)})`` is biased by
``+tr(Σ ∂θA)`` (the sign of the log-det term flips); neither surrogate here is that one.

The model is used only through the model interface: ``precision_operator``, ``rhs``,
``perturbation``, ``preconditioner_diag`` and ``complete_loglik`` (and ``preconditioner`` for
``preconditioner="shared"``).

References
----------
Lin, Tolooshams, Atchadé & Ba, "Probabilistic Unrolling: Scalable, Inverse-Free Maximum
Likelihood Estimation for Latent Gaussian Models", ICML 2023, arXiv:2306.03249 (eqs. 16, 17).
Papandreou & Yuille, "Gaussian sampling by local perturbations", NeurIPS 2010.
Ablin, Peyré & Moreau, "Super-efficiency of automatic differentiation for functions defined
as a minimum", ICML 2020.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from probunroll._capture import capturing
from probunroll.inference.stochastic import fit_stochastic
from probunroll.linalg import cg
from probunroll.linalg.cg import GRAD_MODES
from probunroll.models.base import STOCHASTIC_INTERFACE, check_model_methods

__all__ = [
    "ESTIMATORS",
    "UnrolledConfig",
    "UnrolledSolve",
    "fit_unrolled",
    "network_gradient_surrogate",
    "network_samples_surrogate",
    "output_gradient_surrogate",
    "unrolled_objective",
    "unrolled_solve",
]

ESTIMATORS = ("network", "output", "network_samples")
Params = dict[str, Tensor]


@dataclass(frozen=True)
class UnrolledSolve:
    """Outputs of the unrolled solver for one batch.

    Attributes
    ----------
    mean : Tensor (B, D)
        ``μ^{(I)}``, differentiable in θ unless solved with ``grad="none"``.
    samples : Tensor (K, B, D)
        ``σ_k^{(I)}``.
    perturbations : Tensor (K, B, D)
        The detached ``ε̄_k`` (``Cov = A_θ``) the samples solve for.
    iterations, converged : Tensor (K+1, B)
        CG steps and convergence flags per system.
    preconditioner : Tensor, callable or None
        The ``M⁻¹`` the solves used (detached), for continuing them.
    """

    mean: Tensor
    samples: Tensor
    perturbations: Tensor
    iterations: Tensor
    converged: Tensor
    preconditioner: Any = None


@dataclass(frozen=True)
class UnrolledConfig:
    """Hyperparameters of probabilistic unrolling (validated on construction).

    Attributes
    ----------
    num_samples : int
        K, posterior samples per data point and step.
    unroll_steps : int
        I, CG steps (exactly I, no early exit).
    estimator : {"network", "output", "network_samples"}
        Network-gradient surrogate (backpropagate through the solver), output gradient, or
        the network gradient for the sample term only, with the mean held constant
        (:func:`network_samples_surrogate`).
    grad : {"unroll", "implicit"}
        How the network gradient differentiates the solver: through the I steps, or by one
        adjoint solve (memory independent of I).
    preconditioner : bool or {"jacobi", "shared"}
        ``True``/``"jacobi"``: Jacobi from the model's exact ``diag(A)``. ``"shared"``: the
        model's own ``preconditioner(params, batch)``, one matrix shared by the batch (for
        factor analysis the expected precision under the batch's missingness,
        :meth:`~probunroll.models.factor_analysis.FactorAnalysisModel.preconditioner`; for
        SBL dictionary learning the precision under the batch's geometric-mean prior,
        :meth:`~probunroll.models.sbl_dictionary.SBLDictionaryModel.preconditioner`).
        ``False``: none.
    checkpoint : int or None
        Checkpointed segment length (see :func:`unrolled_solve`).
    warm_start : bool
        Start each data point's mean system at the model's ``initial_mean(batch)`` (models
        with per-point state, e.g. the previous epoch's solution) instead of 0. The sample
        systems always start at 0: their right-hand sides are fresh draws. With
        ``grad="unroll"`` a start that is nearly converged is a hazard: the restarted CG's
        residual then lies in few eigendirections, its I-step recursion is close to breakdown,
        and the backpropagated derivative can blow up (SBL dictionary learning, 16×16 camera
        patches: starts 0.4–1.4% off gave dictionary gradients 10³–10⁵× the exact norm;
        ``benchmarks/sbl_gradient_bias.py --presolve``); ``fit_stochastic(clip_spikes=)``
        bounds such rare steps, and ``grad="implicit"`` has no such derivative.
    mean_steps : int or None
        CG steps for the mean systems (None: ``unroll_steps``, one solve of ``[b, ε̄]``).
        Otherwise the mean runs as its own CG solve, whose rows stop costing matvecs after
        ``mean_steps``. Warm-started (``warm_start``), the mean is ahead of the samples,
        which start from 0: on SBL dictionary learning (16×16 camera patches, 256 atoms,
        output gradient, I=30) the mean's median relative residual after 10 warm steps was
        1e-3 (1e-4–2e-5 late in the fit), the samples' 1e-3 after 30 steps
        (``benchmarks/sbl_solve_residuals.py``). The gradient is more sensitive to the mean's
        error, though: ``mean_steps=10`` with I=40 (K=1) stalled well below the one-solve fit,
        while ``mean_steps=40`` with I=20 cost what I=30 in one solve does and held its level
        ~1000 epochs longer than that fit (SparseBayesianDictionaryLearning, README).
    mean_tol : float or None
        Solve the mean systems (apart from the samples, warm-started as above) to an accuracy
        in the posterior's own scale instead of for a fixed count: each stops once its
        residual ``r = b − Aμ̂`` has ``‖r‖ ≤ mean_tol·√(min_i A_ii)``, after at most
        ``mean_steps`` steps (None: CG's default cap, 10·D). With ``S = D^{-1/2} A D^{-1/2}``
        (``D = diag A``) that bounds the error's Mahalanobis length under the posterior,
        ``‖μ̂ − μ‖_A = √(rᵀA⁻¹r) ≤ mean_tol/√λ_min(S)``, in posterior standard deviations.
        That is ~``mean_tol`` when S is well conditioned (SBL with fewer atoms than
        dimensions: ``λ_min(S)`` ≈ λ_min(ΦᵀΦ), 0.12 on 16×16 camera patches with 256
        atoms); for an overcomplete dictionary ΦᵀΦ is singular, ``λ_min(S)`` ≈ α/(α + β), and
        the residual sees little of the error in Φ's null space (``Ae = αe`` there): bound β
        there (SparseBayesianDictionaryLearning's ``noise_floor``).
        A fixed relative residual does not: ``‖μ̂ − μ‖_A ≈ ‖r‖/√λ`` with ``‖r‖ ∝ ‖b‖``, and
        where ``b`` grows with the noise precision (SBL: ``b = βΦᵀy``) a fixed step count
        leaves an error of more and more posterior standard deviations as β grows, and the
        gradient's systematic error with it. On SBL dictionary learning (16×16 camera
        patches, 256 atoms, K=1) β rose steadily to 5·10⁹, where 40 warm mean steps left
        ``‖r‖/‖b‖`` ≈ 3·10⁻⁷ (about 0.05 posterior standard deviations); the dictionary
        gradient's norm tracked that error, then ran away within 8 steps, and the held-out
        fit fell from 799.6 to 728 (README). The batch's solve runs until its slowest
        system is done (a converged system is frozen, but the batched matvec still costs
        its row); while a CUDA graph is captured it cannot stop early and always runs the
        ``mean_steps`` cap, so give a tight cap there. None: the fixed ``mean_steps``.
    sample_tol : float or None
        Stop each sample solve once ``‖r‖_{M⁻¹} ≤ sample_tol·‖ε̄‖_{M⁻¹}`` (the preconditioned
        norm, ≈ the sample's relative error ``‖σ̂ − σ‖_A/‖σ‖_A`` when M ≈ A), with
        ``unroll_steps`` as the cap: steps are spent only where the preconditioner has
        degraded. With the batch-shared preconditioner on an overcomplete dictionary the
        signals' priors spread apart as the fit goes on, ten steps that were ample early
        (relative error 8·10⁻³ at 2× overcompleteness) leave ~0.14 at 4×, and the fixed-step
        fit fell there (16×16 camera patches, 1024 atoms); ``sample_tol=0.05`` with a cap of
        40 removed the fall but slowed the early epochs, where the 10-step fit had climbed
        faster. None: exactly ``unroll_steps``. Without a preconditioner the norm is
        the plain residual's.
    mean_norm : {"diagonal", "preconditioned"}
        How ``mean_tol`` is measured. ``"diagonal"``: ``‖r‖ ≤ mean_tol·√(min_i A_ii)``, as
        above. ``"preconditioned"``: ``‖r‖_{M⁻¹} = √(rᵀM⁻¹r) ≤ mean_tol`` with the solve's
        preconditioner M (CG forms ``rᵀM⁻¹r`` every step anyway), which is ``‖μ̂ − μ‖_A``,
        the error in posterior standard deviations, to the extent that ``M ≈ A``
        (``κ(M⁻¹A)``-close, whatever A's own conditioning): with the batch-shared
        preconditioner the residual's null-space components ``Ae = αe`` are weighed by
        ``1/ᾱ`` instead of by ``1/min A_ii``. On SBL dictionary learning at 512 atoms (16×16
        camera patches) ``‖r‖_{M⁻¹}`` tracked ``‖e‖_A`` within ~30%, where the diagonal bound
        let the error reach ~10× ``mean_tol`` at 4× overcompleteness. Needs a
        preconditioner (without one, the diagonal rule).
    mean_round : int or None
        With ``mean_tol``: solve the mean in rounds of this many CG steps, each on the rows
        still above their tolerance only (CG restarted there from the last iterate, with the
        preconditioner formed for those rows), so a converged row stops costing matvecs; the
        ``mean_steps`` cap bounds the steps of all rounds together. In one solve the batch
        runs until its slowest row is done, and every row costs a matvec row each step: on
        SBL dictionary learning at 1024 atoms (16×16 camera patches, 4× overcomplete, shared
        preconditioner, epoch 45) the rows needed 28 steps (median), 60 (90%) and 87 (max),
        so one solve cost 83 row-steps per signal, rounds of 25 steps 46. Ignored while a
        CUDA graph is captured (its shapes are fixed). None: one solve.
    variance_steps : int
        Models with a per-point step (``update_local``): continue the K sample solves by this
        many CG steps, without a graph, before their Monte Carlo ``diag Σ`` goes to that
        step (the gradient is unchanged). Samples from I truncated steps have too little
        variance: on SBL dictionary learning (8×8 patches, 256 atoms) the estimate was 30% low
        on the active atoms at I=10, 16% at I=20, 7% at I=40. Costs ``K·variance_steps``
        forward matvecs per point. Measured there (lr 0.1, held-out α refitted): 30 extra
        steps left the epochs to within 1% of EM's held-out optimum unchanged (774) at 28%
        more time per epoch, so the default is 0. With SAEM's decaying α steps, whose noise no
        longer hides the bias, 20 steps raised the held-out peak on 16×16 patches (256 atoms,
        K=1, I=10) from 784.7 to 791.9 at 12% more time per epoch.
    """

    num_samples: int = 5
    unroll_steps: int = 20
    estimator: str = "network"
    grad: str = "unroll"
    preconditioner: bool | str = True
    checkpoint: int | None = None
    warm_start: bool = True
    variance_steps: int = 0
    mean_steps: int | None = None
    mean_tol: float | None = None
    mean_round: int | None = None
    mean_norm: str = "diagonal"
    sample_tol: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_samples", "unroll_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.grad not in ("unroll", "implicit"):
            raise ValueError(f"grad must be 'unroll' or 'implicit', got {self.grad!r}")
        check_preconditioner(self.preconditioner)
        ms = self.mean_steps
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, int) or ms < 1):
            raise ValueError(f"mean_steps must be None or a positive integer, got {ms!r}")
        check_mean_tol(self.mean_tol)
        check_mean_round(self.mean_round, self.mean_tol)
        check_mean_norm(self.mean_norm)
        check_sample_tol(self.sample_tol)
        steps = self.variance_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"variance_steps must be a non-negative integer, got {steps!r}")
        seg = self.checkpoint
        if seg is not None and (isinstance(seg, bool) or not isinstance(seg, int) or seg < 1):
            raise ValueError(f"checkpoint must be None or a positive segment length, got {seg!r}")

    def solve_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`unrolled_solve` (no graph for the output gradient)."""
        return {
            "num_samples": self.num_samples,
            "unroll_steps": self.unroll_steps,
            "grad": "none" if self.estimator == "output" else self.grad,
            "mean_grad": "none" if self.estimator == "network_samples" else None,
            "preconditioner": self.preconditioner,
            "checkpoint": self.checkpoint,
            "mean_steps": self.mean_steps,
            "mean_tol": self.mean_tol,
            "mean_round": self.mean_round,
            "mean_norm": self.mean_norm,
            "sample_tol": self.sample_tol,
        }


def check_mean_tol(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a positive finite number."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if value is not None and not (ok and 0.0 < value < math.inf):
        raise ValueError(f"mean_tol must be None or a positive number, got {value!r}")


MEAN_NORMS = ("diagonal", "preconditioned")


def check_mean_norm(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is one of :data:`MEAN_NORMS`."""
    if value not in MEAN_NORMS:
        raise ValueError(f"mean_norm must be one of {MEAN_NORMS}, got {value!r}")


def check_sample_tol(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a number in (0, 1)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if value is not None and not (ok and 0.0 < value < 1.0):
        raise ValueError(f"sample_tol must be None or a number in (0, 1), got {value!r}")


def check_mean_round(value: object, mean_tol: object) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a positive integer given with a
    ``mean_tol`` (rounds drop the rows that met their tolerance)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mean_round must be None or a positive integer, got {value!r}")
    if mean_tol is None:
        raise ValueError("mean_round needs mean_tol: the rounds drop the rows that met it")


PRECONDITIONERS = (True, False, "jacobi", "shared")


def check_preconditioner(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is one of :data:`PRECONDITIONERS`."""
    if not any(value is v if isinstance(v, bool) else value == v for v in PRECONDITIONERS):
        raise ValueError(f"preconditioner must be True/'jacobi', 'shared' or False, got {value!r}")


def _preconditioner(model: Any, params: Params, batch: tuple[Tensor, ...], kind: object):
    """The CG preconditioner ``M⁻¹`` (detached): a Jacobi diagonal, the model's shared
    matrix, or None."""
    check_preconditioner(kind)
    if kind is False:
        return None
    if kind == "shared":
        # the same TypeError as fit_unrolled's up-front check of the interface
        check_model_methods(model, "preconditioner='shared'", ("preconditioner",))
        return model.preconditioner(params, batch)
    return model.preconditioner_diag(params, batch).detach().reciprocal()


def unrolled_solve(
    model: Any,
    params: Params,
    batch: tuple[Tensor, ...],
    *,
    num_samples: int = 5,
    unroll_steps: int | None = 20,
    generator: torch.Generator | None = None,
    grad: str = "unroll",
    preconditioner: bool | str = True,
    tol: float | None = None,
    checkpoint: int | None = None,
    perturbations: Tensor | None = None,
    mean0: Tensor | None = None,
    mean_steps: int | None = None,
    mean_tol: float | None = None,
    mean_round: int | None = None,
    mean_norm: str = "diagonal",
    sample_tol: float | None = None,
    mean_grad: str | None = None,
) -> UnrolledSolve:
    """Posterior mean and K perturb-and-solve samples from one batched CG on ``[b, ε̄_1..ε̄_K]``.

    Parameters
    ----------
    model : latent Gaussian model
        Provides ``precision_operator``, ``rhs``, ``perturbation``, ``preconditioner_diag``.
    params : dict of Tensor
        Parameters θ (leaves that may require grad).
    batch : tuple of Tensor
        One minibatch of data points (B points).
    num_samples : int
        K, the number of posterior samples.
    unroll_steps : int or None
        I, the number of CG steps (exactly I when ``tol`` is None).
    generator : torch.Generator, optional
        Draws the perturbations.
    grad : {"unroll", "implicit", "none"}
        Backpropagate through the I steps, by one adjoint solve, or not at all.
    preconditioner : bool or {"jacobi", "shared"}
        Jacobi from the model's exact ``diag(A)``, the model's shared matrix, or none
        (detached; see :class:`UnrolledConfig`).
    tol : float, optional
        With a tolerance the solve stops per system (for "exact" solves in tests).
    checkpoint : int, optional
        Activation checkpointing (``grad="unroll"`` only): the CG iterations run in segments of
        this many steps that are recomputed in the backward pass instead of stored
        (:func:`probunroll.linalg.cg` ``checkpoint_every``), so the stored graph is
        O(I/segment + segment) instead of O(I). The iterates are those of plain CG.
    perturbations : Tensor (K, B, D), optional
        Use these ``ε̄`` instead of drawing new ones (tests, common random numbers).
    mean0 : Tensor (B, D), optional
        Warm start of the mean system (detached); the sample systems start at 0. The
        unrolled iterates then depend on θ only through A and b, as without a warm start.
    mean_steps : int, optional
        CG steps for the mean systems when they differ from ``unroll_steps``: the mean and
        the samples then run as two CG solves (same A, same preconditioner), each set of
        rows costing matvecs for its own steps only. None: one solve of ``[b, ε̄]``.
    mean_tol : float, optional
        Solve the mean systems apart until ``‖b − Aμ̂‖ ≤ mean_tol·√(min_i A_ii)`` per system
        (``A_ii`` from the model's ``preconditioner_diag``), at most ``mean_steps`` steps
        (None: CG's default cap); see :class:`UnrolledConfig`. Not with ``tol``.
    mean_round : int, optional
        With ``mean_tol``: solve the mean in rounds of this many steps on the rows not yet
        converged (:class:`UnrolledConfig`); not while a CUDA graph is captured.
    mean_norm : {"diagonal", "preconditioned"}
        ``mean_tol`` on ``‖r‖/√(min_i A_ii)`` or on ``‖r‖_{M⁻¹} = √(rᵀM⁻¹r)``
        (:class:`UnrolledConfig`).
    sample_tol : float, optional
        Stop each sample solve at ``‖r‖_{M⁻¹} ≤ sample_tol·‖ε̄‖_{M⁻¹}``, at most
        ``unroll_steps`` steps (:class:`UnrolledConfig`); the samples then run apart from
        the mean. Not with ``tol``.
    mean_grad : {"unroll", "implicit", "none"}, optional
        How the mean is differentiated when it differs from the samples' ``grad`` (None: the
        same). ``"none"`` with ``grad="unroll"`` gives the samples a graph and the mean
        none (``estimator="network_samples"``); the mean then comes back detached. Any other
        value that differs from ``grad`` needs the mean solved apart (``mean_steps``,
        ``mean_tol`` or ``sample_tol``).

    Returns
    -------
    UnrolledSolve
    """
    if perturbations is None:
        perturbations = model.perturbation(params, batch, generator, num_samples)
    eps = perturbations.detach()
    b = model.rhs(params, batch)
    A = model.precision_operator(params, batch)
    m_inv = _preconditioner(model, params, batch, preconditioner)
    every = checkpoint if checkpoint is not None and grad == "unroll" else 0
    solve = dict(M_inv=m_inv, tol=tol, grad=grad, warn=tol is not None, checkpoint_every=every)
    check_mean_tol(mean_tol)
    check_mean_round(mean_round, mean_tol)
    check_mean_norm(mean_norm)
    check_sample_tol(sample_tol)
    if tol is not None and (mean_tol is not None or sample_tol is not None):
        raise ValueError("give tol (every system) or mean_tol / sample_tol, not both")
    if mean_grad not in (None, *GRAD_MODES):
        raise ValueError(f"mean_grad must be None or one of {GRAD_MODES}, got {mean_grad!r}")
    apart = (
        mean_tol is not None
        or sample_tol is not None
        or (mean_steps is not None and mean_steps != unroll_steps)
    )
    if apart:  # the mean with its own steps (or its own tolerance)
        x0 = None if mean0 is None else mean0.detach()
        fixed_mean = mean_steps is None and mean_tol is None  # apart for sample_tol only
        mean_solve = dict(solve, max_iters=unroll_steps if fixed_mean else mean_steps)
        if mean_grad is not None:
            mean_solve["grad"] = mean_grad
        if mean_tol is not None:  # an absolute tolerance per system, in the chosen norm
            atol, norm = _mean_tolerance(model, params, batch, m_inv, mean_tol, mean_norm)
            # the cap, not the tolerance, decides a system that misses it: no warning
            mean_solve.update(atol=atol, warn=False, norm=norm)
        if mean_round is not None and not capturing(b):
            mean_x, mean_its, mean_conv = _mean_in_rounds(
                model,
                params,
                batch,
                A,
                b,
                x0,
                preconditioner,
                mean_solve,
                mean_round,
            )
        else:
            mean = cg(A, b, x0=x0, **mean_solve)
            mean_x, mean_its, mean_conv = mean.x, mean.iterations, mean.converged
        sample_solve = solve
        if sample_tol is not None:  # per system, in the preconditioned norm; the cap decides
            sample_solve = dict(solve, tol=sample_tol, warn=False, norm="preconditioned")
        samples = cg(A, eps, max_iters=unroll_steps, **sample_solve)
        return UnrolledSolve(
            mean=mean_x,
            samples=samples.x,
            perturbations=eps,
            iterations=torch.cat([mean_its.unsqueeze(0), samples.iterations]),
            converged=torch.cat([mean_conv.unsqueeze(0), samples.converged]),
            preconditioner=m_inv,
        )
    if mean_grad not in (None, "none", grad):  # one solve: the mean can only be detached
        raise ValueError(
            f"mean_grad={mean_grad!r} with grad={grad!r} needs the mean solved apart "
            "(mean_steps, mean_tol or sample_tol)"
        )
    rhs = torch.cat([b.unsqueeze(0), eps], dim=0)  # (K+1, B, D)
    x0 = None
    if mean0 is not None:
        x0 = torch.cat([mean0.detach().unsqueeze(0), torch.zeros_like(eps)], dim=0)
    res = cg(A, rhs, x0=x0, max_iters=unroll_steps, **solve)
    return UnrolledSolve(
        mean=res.x[0].detach() if mean_grad == "none" else res.x[0],
        samples=res.x[1:],
        perturbations=eps,
        iterations=res.iterations,
        converged=res.converged,
        preconditioner=m_inv,
    )


def _mean_tolerance(
    model: Any,
    params: Params,
    batch: tuple[Tensor, ...],
    m_inv: Any,
    mean_tol: float,
    mean_norm: str,
) -> tuple[float | Tensor, str]:
    """The mean solve's absolute tolerance for :func:`~probunroll.linalg.cg` (its ``atol``)
    and the norm it is in: ``‖r‖ ≤ τ√(min_i A_ii)`` per system ("diagonal", a (B,) tensor:
    about τ posterior standard deviations) or ``‖r‖_{M⁻¹} ≤ τ`` ("preconditioned", with M
    the solve's preconditioner ``m_inv``: ``‖μ̂ − μ‖_A ≈ τ``, the same τ for every system
    whatever M; without a preconditioner, the diagonal rule)."""
    if mean_norm == "preconditioned" and m_inv is not None:
        return float(mean_tol), "preconditioned"
    with torch.no_grad():
        d_min = model.preconditioner_diag(params, batch).detach().amin(-1)
        return mean_tol * d_min.clamp_min(0.0).sqrt(), "residual"


def _mean_in_rounds(
    model: Any,
    params: Params,
    batch: tuple[Tensor, ...],
    A: Any,
    b: Tensor,
    x0: Tensor | None,
    kind: object,
    solve: dict[str, Any],
    round_steps: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The mean solve of :func:`unrolled_solve` in rounds of ``round_steps`` CG steps, each
    on the rows (data points) still above their tolerance: the model's operator and
    preconditioner for those rows, CG restarted from their last iterate. The first round is
    the whole batch with its operator ``A`` and ``solve``'s ``M_inv``; ``solve`` also holds
    the absolute ``atol`` (a float, or per row (B,); :func:`_mean_tolerance`), the same under
    any round's preconditioner, and the cap ``max_iters`` on all rounds' steps together
    (None: CG's 10·D). Each round starts from a detached iterate, as a warm start does, so
    with ``grad="unroll"`` a row's mean is differentiated through its last round's steps.
    Returns the iterate, the steps per row and the convergence flags."""
    n_rows, dim = b.shape
    x = torch.zeros_like(b) if x0 is None else x0
    atol = solve["atol"]
    left = solve["max_iters"] if solve["max_iters"] is not None else 10 * dim
    iterations = torch.zeros(n_rows, dtype=torch.int64, device=b.device)
    converged = torch.zeros(n_rows, dtype=torch.bool, device=b.device)
    rows = torch.arange(n_rows, device=b.device)
    while rows.numel() and left > 0:
        step = dict(solve, max_iters=min(round_steps, left))
        if isinstance(atol, Tensor):
            step["atol"] = atol[rows]
        if rows.numel() < n_rows:  # the rows left: their own operator and preconditioner
            sub = tuple(t[rows] for t in batch)
            A = model.precision_operator(params, sub)
            step["M_inv"] = _preconditioner(model, params, sub, kind)
        res = cg(A, b[rows], x0=x[rows].detach(), **step)
        x = x.index_put((rows,), res.x)
        iterations = iterations.index_add(0, rows, res.iterations)
        converged = converged.index_put((rows,), res.converged)
        left -= int(res.iterations.max())
        rows = rows[~res.converged]
    return x, iterations, converged


def output_gradient_surrogate(
    model: Any, params: Params, batch: tuple[Tensor, ...], solve: UnrolledSolve
) -> Tensor:
    """``L_OG,n(θ) = log p_θ(ỹ_n, sg μ_n) − (1/2K) Σ_k sg σ_kᵀ A_θ sg σ_k``, shape (B,).

    The solver outputs are detached; the gradient is ``∂θ log p_θ(ỹ, μ̂) − (1/2K) Σ_k
    σ̂_kᵀ(∂θA)σ̂_k``, the low-variance output-gradient estimator (paper eq. 16).
    """
    mean, samples = solve.mean.detach(), solve.samples.detach()
    quad = (samples * model.precision_operator(params, batch)(samples)).sum(-1).mean(0)
    return model.complete_loglik(params, batch, mean) - 0.5 * quad


def _network_sample_term(
    model: Any, params: Params, batch: tuple[Tensor, ...], solve: UnrolledSolve
) -> Tensor:
    """``(1/K) Σ_k [σ_kᵀ ε̄_k − ½ σ_kᵀ A_θ σ_k]`` with the samples' graph kept, shape (B,)."""
    samples = solve.samples
    quad = (samples * model.precision_operator(params, batch)(samples)).sum(-1)
    linear = (samples * solve.perturbations).sum(-1)
    return (linear - 0.5 * quad).mean(0)


def network_gradient_surrogate(
    model: Any, params: Params, batch: tuple[Tensor, ...], solve: UnrolledSolve
) -> Tensor:
    """``L_NG,n(θ) = log p_θ(ỹ_n, μ^{(I)}) + (1/K) Σ_k [σ_kᵀ ε̄_k − ½ σ_kᵀ A_θ σ_k]``, shape (B,).

    ``μ^{(I)}`` and ``σ_k^{(I)}`` keep their graph through the unrolled solver; ``ε̄_k`` is
    detached. At the exact solution the partial derivatives in μ and σ_k vanish, and the
    expectation over ε̄ of the remaining ``−½ σ_kᵀ(∂θA)σ_k`` is ``−½ tr(Σ ∂θA)``.
    """
    return model.complete_loglik(params, batch, solve.mean) + _network_sample_term(
        model, params, batch, solve
    )


def network_samples_surrogate(
    model: Any, params: Params, batch: tuple[Tensor, ...], solve: UnrolledSolve
) -> Tensor:
    """``L_n(θ) = log p_θ(ỹ_n, sg μ_n) + (1/K) Σ_k [σ_kᵀ ε̄_k − ½ σ_kᵀ A_θ σ_k]``, shape (B,):
    the output gradient's mean term and the network gradient's sample term.

    For fixed ``ε̄`` the sample term's value at the I-th CG iterate is ``½ ε̄ᵀσ^{(I)}``
    (Galerkin: ``σ^{(I)}ᵀ(ε̄ − Aσ^{(I)}) = 0``), the Gauss-quadrature estimate of
    ``½ ε̄ᵀA⁻¹ε̄``, whose error ``½‖σ − σ^{(I)}‖²_A`` is the square of the sample's. The output
    gradient's ``−½ σ̂ᵀ(∂θA)σ̂`` misses ``−σ̂ᵀ(∂θA)e − ½ eᵀ(∂θA)e`` (``e = σ − σ̂``), first
    order in the error, and a CG solve stopped early from 0 misses most of the
    small-eigenvalue directions of A, so the miss has a sign: on SBL dictionary learning
    with samples solved to 0.1 it pushed ``∂/∂ log β`` up by 77 standard errors
    (``benchmarks/sbl_beta_gradient_bias.py``), and β ran away. The mean is detached: it is
    meant to be solved tightly (``mean_tol``), warm-started, where backpropagating through
    a nearly converged restarted CG is hazardous (:class:`UnrolledConfig` ``warm_start``).

    Measured there (16×16 camera patches, 1024 atoms, epoch 30, samples to 0.1): the bias
    fell from +77 to +31 standard errors with ``grad="unroll"`` and to +5.7 with
    ``grad="implicit"`` (whose adjoint solve ``Aλ = ε̄ − Aσ̂`` mostly continues the sample
    solve), but no cheaper than solving the samples tighter for the output gradient (to
    0.001: unbiased at 0.81 s per 128-signal draw against 0.67 s for implicit at 0.1, +5.7).
    After one CG step from 0 it equals the output gradient: the iterate ``cε̄`` is optimal
    along a direction that does not depend on θ.
    """
    mean = solve.mean.detach()
    return model.complete_loglik(params, batch, mean) + _network_sample_term(
        model, params, batch, solve
    )


SURROGATES = {
    "network": network_gradient_surrogate,
    "output": output_gradient_surrogate,
    "network_samples": network_samples_surrogate,
}


def sample_variance(samples: Tensor, perturbations: Tensor, diag: Tensor) -> Tensor:
    """Rao–Blackwellised Monte Carlo ``diag Σ`` from perturb-and-solve samples.

    Under ``z ~ N(μ, Σ)``, ``Σ = A⁻¹``, each coordinate given the others is Gaussian with
    variance ``1/A_ii`` and mean ``μ_i − (1/A_ii) Σ_{j≠i} A_ij (z_j − μ_j)``, so
    ``Σ_ii = 1/A_ii + Var(E[z_i | z_{−i}])`` (law of total variance). At a sample
    ``z = μ + σ_k`` with ``σ_k = A⁻¹ε_k`` (``Cov(ε_k) = A``) that conditional mean is
    ``μ_i + σ_ki − ε_ki/A_ii``, which gives

    ``Σ̂_ii = 1/A_ii + (1/K) Σ_k (σ_ki − ε_ki/A_ii)²``.

    It is unbiased, never below the bound ``Σ_ii ≥ 1/A_ii`` that holds for any SPD A, and
    exact where A is diagonal (SBL's pruned atoms, α_i ≫ β‖φ_i‖²). With ``u = σ − ε/diag A``
    independent of ``ε/diag A`` (their covariance is ``Σ A D⁻¹ − D⁻¹ = 0``), its variance is
    ``2(Σ_ii − 1/A_ii)²/K``, against ``2Σ_ii²/K`` for the plain ``mean_k σ_ki²`` and
    ``[2(Σ_ii − 1/A_ii)² + 4(Σ_ii − 1/A_ii)/A_ii]/K`` for the Jacobi control variate
    ``σ² − (ε/A_ii)² + 1/A_ii``: the gain is largest for the barely-active atoms whose α step
    decides whether they are pruned.
    Shapes: samples and perturbations (K, B, D), diag (B, D); returns (B, D).

    Reference: Rao–Blackwellised Gibbs estimators of Gaussian variances (Gelfand & Smith,
    JASA 1990); Papandreou & Yuille (2010) for the perturb-and-solve samples.
    """
    return (samples - perturbations / diag).square().mean(0) + diag.reciprocal()


def unrolled_objective(
    model: Any,
    params: Params,
    batch: tuple[Tensor, ...],
    generator: torch.Generator | None = None,
    config: UnrolledConfig | None = None,
) -> tuple[Tensor, dict]:
    """Mean over the batch of the configured surrogate, with fresh perturbations; its gradient
    estimates ``mean_n ∇θ log p_θ(ỹ_n)``. Returns ``(value, info)`` with the CG step counts.

    A model with ``update_local(params, batch, mean, var)`` (per-data-point hyperparameters
    such as SBL's prior precisions) gets the solved means and a Monte Carlo ``diag Σ`` after
    the surrogate is formed: :func:`sample_variance`, from the sample solves continued by
    ``config.variance_steps`` CG steps. A model with ``initial_mean(batch)``
    warm-starts the mean solves from it (``config.warm_start``): with I fixed, the solve
    error then shrinks across epochs as θ settles instead of staying at I steps from 0."""
    config = UnrolledConfig() if config is None else config
    mean0 = None
    if config.warm_start and hasattr(model, "initial_mean"):
        mean0 = model.initial_mean(batch)
    solve = unrolled_solve(
        model, params, batch, generator=generator, mean0=mean0, **config.solve_kwargs()
    )
    value = SURROGATES[config.estimator](model, params, batch, solve).mean()
    if hasattr(model, "update_local"):  # per-point hyperparameters: EM step from the samples
        with torch.no_grad():
            diag = model.preconditioner_diag(params, batch).detach()
            samples = solve.samples.detach()
            if config.variance_steps:  # refine the truncated sample solves (no graph)
                samples = cg(
                    model.precision_operator(params, batch),
                    solve.perturbations,
                    x0=samples,
                    M_inv=solve.preconditioner,
                    tol=None,
                    max_iters=config.variance_steps,
                    grad="none",
                    warn=False,
                ).x
            var = sample_variance(samples, solve.perturbations, diag)
            model.update_local(params, batch, solve.mean.detach(), var)
    return value, {"cg_iterations": solve.iterations, "converged": solve.converged}


def fit_unrolled(
    model: Any,
    params: Params,
    data: tuple[Tensor, ...],
    config: UnrolledConfig | None = None,
    **loop: Any,
) -> tuple[Params, list[dict[str, Any]]]:
    """Fit by probabilistic unrolling: per minibatch, fresh perturbations, I unrolled CG
    steps, a surrogate gradient and one optimizer step.

    ``config`` holds K, I, the estimator and the solver options (:class:`UnrolledConfig`);
    ``loop`` goes to :func:`probunroll.inference.stochastic.fit_stochastic` (``batch_size``,
    ``max_epochs``, ``optimizer`` (Adam by default), ``lr``, ``lr_schedule``, ``monitor``,
    ``tol``, ``patience``, ``generator``, ``progress``). Cost per point and step:
    O(I(K+1)·matvec); backprop memory O(I(K+1)D) (``checkpoint`` or ``grad="implicit"``
    reduce it).
    """
    config = UnrolledConfig() if config is None else config
    shared = config.preconditioner == "shared"
    check_model_methods(
        model, "fit_unrolled", STOCHASTIC_INTERFACE + (("preconditioner",) if shared else ())
    )
    objective = lambda p, b, g: unrolled_objective(model, p, b, g, config)  # noqa: E731
    loop.setdefault("desc", "unrolled")
    return fit_stochastic(objective, params, data, **loop)
