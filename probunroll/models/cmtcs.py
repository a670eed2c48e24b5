"""Clustered multi-task compressive sensing (CMTCS): tasks in clusters that share sparsity
profiles, fitted by exact EM or covariance-free EM.

Model: tasks ``t = 1..T`` with their own masks ``Ω_t`` and one operator ``Φ``; task ``t`` has
a latent label ``q_t`` with ``P(q_t = c) = π_c``, and given ``q_t = c``

.. math::

    x_t \\sim \\mathcal N(0, \\operatorname{diag}(\\alpha_c)^{-1}),\\qquad
    y_t \\mid x_t \\sim \\mathcal N(\\Phi x_t, \\beta^{-1} I) \\text{ on } \\Omega_t.

EM over the labels and the signals: the E-step computes, for every pair ``(c, t)``, the
posterior of ``A_{ct} = \\operatorname{diag}(\\alpha_c) + \\beta\\Phi^\\top\\Omega_t\\Phi`` and the
marginal log-likelihood :math:`\\ell_{ct}`; the responsibilities are
:math:`r_{ct} = \\operatorname{softmax}_c(\\log\\pi_c + \\ell_{ct})`; the M-step is

.. math::

    \\alpha_{c,i} = \\frac{\\sum_t r_{ct}}{\\sum_t r_{ct}(\\mu_{ct,i}^2 + \\Sigma_{ct,ii})},\\qquad
    \\pi_c = \\frac1T\\sum_t r_{ct},

plus the noise step of :func:`probunroll.models.sbl.noise_precision_update` weighted by
``r`` when ``β`` is learned. Modes: ``"clustered"`` (the mixture), ``"joint"`` (one profile
for all tasks) and ``"separate"`` (one profile per task, i.e. independent SBL).

With ``method="cofem"`` the ``C × T`` posteriors come from one batched CG run per E-step with
probes shared across clusters (common random numbers), so the SLQ noise largely cancels in
the differences :math:`\\ell_{1t} - \\ell_{2t}` that set the responsibilities; the research code
draws independent probes per cluster. Unlike it, ``π`` is learned, responsibilities stay soft,
and the initial symmetry between clusters is broken by random responsibilities in the first
M-step rather than by noise in ``α``.

References
----------
.. [1] A. Lin, D. Ba, "An efficient algorithm for clustered multi-task compressive sensing",
   arXiv:2310.00420.
.. [2] Y. Qi, D. Liu, D. Dunson, L. Carin, "Multi-task compressive sensing with Dirichlet
   process priors", ICML 2008.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probunroll._params import ParamsMixin
from probunroll.inference.loop import run_em
from probunroll.models import _validation as check
from probunroll.models._estimator import EMEstimator
from probunroll.models.base import LatentGaussianModel, LinearGaussian, PosteriorMoments
from probunroll.models.sbl import SBLBatch, noise_precision_update

_MODES = ("clustered", "separate", "joint")


@dataclass(frozen=True)
class CMTCSParams:
    """CMTCS parameters.

    ``alpha``: ``(C, 1, D)`` (clustered, joint with ``C = 1``) or ``(1, T, D)`` (separate);
    ``noise_precision``: ``(1, 1, 1)``; ``log_weights``: ``(C,)``, the log mixing weights.
    """

    alpha: Tensor
    noise_precision: Tensor
    log_weights: Tensor


class CMTCSModel(LatentGaussianModel):
    """The CMTCS latent Gaussian model; its batch shape is ``(C, T)`` (clusters × tasks).

    Parameters
    ----------
    design : operator, shape (N, D)
        The shared sensing operator ``Φ``.
    learn_noise : bool
        Update ``β`` in the M-step.
    """

    def __init__(self, design: Any, *, learn_noise: bool = True) -> None:
        self.design = design
        self.learn_noise = learn_noise

    def linear_gaussian(self, params: CMTCSParams, batch: SBLBatch) -> LinearGaussian:
        """Posterior pieces for every (cluster, task) pair, batch shape ``(C, T)``."""
        return LinearGaussian(
            prior_precision=params.alpha,
            design=self.design,
            noise_precision=params.noise_precision,
            target=batch.y,
            mask=batch.mask,
        )

    @staticmethod
    def responsibilities(params: CMTCSParams, loglik: Tensor) -> Tensor:
        """``r_ct = softmax_c(log π_c + ℓ_ct)``, shape ``(C, T)``."""
        return torch.softmax(params.log_weights[:, None] + loglik, dim=0)

    @staticmethod
    def mixture_loglik(params: CMTCSParams, loglik: Tensor) -> Tensor:
        """``Σ_t log Σ_c π_c p(y_t | c)`` from the per-pair ``ℓ_ct``."""
        return torch.logsumexp(params.log_weights[:, None] + loglik, dim=0).sum()

    def m_step(
        self,
        params: CMTCSParams,
        batch: SBLBatch,
        stats: PosteriorMoments,
        responsibilities: Tensor | None = None,
    ) -> CMTCSParams:
        """Update ``α``, ``π`` (and ``β``) from the moments; ``responsibilities`` ``(C, T)``
        default to :meth:`responsibilities` of ``stats.loglik``."""
        resp = responsibilities
        if resp is None:
            resp = self.responsibilities(params, stats.loglik)
        resp = resp.clamp_min(torch.finfo(resp.dtype).eps)
        second = stats.mean * stats.mean + stats.variance  # (C, T, D)
        if params.alpha.shape[-2] == 1:
            weight_sum = resp.sum(-1)[:, None, None]
            alpha = weight_sum / (resp[..., None] * second).sum(-2, keepdim=True)
        else:  # separate: one profile per task
            alpha = 1.0 / second
        log_weights = torch.log(resp.mean(-1))
        log_weights = log_weights - torch.logsumexp(log_weights, 0)
        beta = params.noise_precision
        if self.learn_noise:
            lg = self.linear_gaussian(params, batch)
            beta = noise_precision_update(lg, stats, weights=resp, dims=(0, 1)).reshape(beta.shape)
        return CMTCSParams(alpha=alpha, noise_precision=beta, log_weights=log_weights)

    def complete_loglik(
        self, params: CMTCSParams, batch: SBLBatch, z: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """``log p(y_t, x_t | q_t = c)`` for all pairs ``(C, T)`` given ``z`` ``(T, D)``; with
        ``labels`` ``(T,)``, the joint ``log π_{q_t} + log p(y_t, x_t | q_t)`` per task."""
        table = super().complete_loglik(params, batch, z)
        if labels is None:
            return table
        if table.shape[0] == 1:  # joint / separate: a single profile (no label variable)
            return table[0]
        picked = table.gather(0, labels[None]).squeeze(0)
        return params.log_weights[labels] + picked


class ClusteredMultiTaskCS(ParamsMixin, EMEstimator):
    """Clustered multi-task compressive sensing by exact EM or covariance-free EM.

    Parameters
    ----------
    n_clusters : int
        Number of clusters ``C`` (``mode="clustered"``).
    method : {"cofem", "em"}
        Covariance-free E-step (batched CG with probes shared across clusters, SLQ
        log-likelihoods) or the exact posterior (Cholesky; Woodbury over the observed entries
        when they are fewer than the latents).
    mode : {"clustered", "separate", "joint"}
        A mixture of ``C`` sparsity profiles, one profile per task, or one for all tasks.
    num_probes : int
        Probes ``K`` per E-step (``cofem``).
    max_iter : int
        EM iterations.
    tol : float, optional
        Stop once an M-step moves every posterior mean by at most ``tol`` relative to its
        norm (``history_`` then records ``mean_change``); ``None`` (default) runs all
        ``max_iter`` iterations. With ``cofem`` keep ``tol`` above ``cg_tol``: the means carry
        the CG error.
    noise_precision : float, optional
        Fixed ``β = 1/σ²``; ``None`` learns one ``β`` shared by all tasks.
    alpha_init : float
        Initial prior precisions.
    noise_precision_init : float, optional
        Initial ``β`` when learned (default ``10 / var(Y)`` over observed entries).
    shared_probes : bool
        Use the same probes for every cluster (``cofem``).
    cg_tol, max_cg_iter
        Per-system CG tolerance (default ``max(1e-4, 1e4·eps)``, see
        :class:`~probunroll.SparseBayesianLearning`) and iteration limit (``cofem``).
    em_form : {"auto", "precision", "woodbury"}
        Exact form for ``em`` (see :func:`probunroll.inference.exact_posterior`).
    random_state : int, torch.Generator or None
        Seeds the probes and the initial responsibilities.
    device, dtype : optional
        Where and in which precision to compute (default: those of ``Y``; float64 for numpy).
    progress : bool
        Show a progress bar (only on a terminal).

    Attributes
    ----------
    coef_ : Tensor, shape (T, D)
        Posterior mean of each task under its most responsible cluster.
    mixture_coef_ : Tensor, shape (T, D)
        Posterior mean averaged over clusters with the responsibilities (the Bayes estimate).
    posterior_variance_ : Tensor, shape (T, D)
        Posterior variances under the assigned cluster.
    labels_ : Tensor, shape (T,)
        Most responsible cluster per task (``separate``: the task index; ``joint``: 0).
    responsibilities_ : Tensor, shape (T, C)
        Posterior cluster probabilities (``separate``: the identity).
    alpha_ : Tensor, shape (C, D)
        Sparsity profiles (``separate``: ``(T, D)``; ``joint``: ``(1, D)``).
    weights_ : Tensor, shape (C,)
        Mixing weights ``π``.
    noise_precision_ : Tensor, shape ()
    loglik_ : Tensor, shape ()
        Mixture log-likelihood ``Σ_t log Σ_c π_c p(y_t | c)`` at the final parameters.
    history_ : list of dict
        Per iteration: ``iteration``, ``seconds``, ``loglik`` (mixture log-likelihood), and for
        ``cofem`` ``cg_iterations``, ``converged``, ``cg_residual``.
    operator_ : LinearOperator
        ``Φ`` as an operator.
    model_ : CMTCSModel
        The model (its interface evaluates log-likelihoods at other parameters or data).

    References
    ----------
    .. [1] A. Lin, D. Ba, "An efficient algorithm for clustered multi-task compressive
       sensing", arXiv:2310.00420.

    Examples
    --------
    >>> import probunroll as pu
    >>> from probunroll.data.synthetic import make_cmtcs_problem
    >>> prob = make_cmtcs_problem(64, 6, 2, observed_fraction=0.5, random_state=0)
    >>> est = pu.ClusteredMultiTaskCS(2, max_iter=10, noise_precision=400.0, random_state=0)
    >>> est.fit(prob.Phi, prob.Y, masks=prob.masks).coef_.shape
    torch.Size([6, 64])
    """

    def __init__(
        self,
        n_clusters: int = 2,
        method: str = "cofem",
        *,
        mode: str = "clustered",
        num_probes: int = 15,
        max_iter: int = 30,
        tol: float | None = None,
        noise_precision: float | None = None,
        alpha_init: float = 1.0,
        noise_precision_init: float | None = None,
        shared_probes: bool = True,
        cg_tol: float | None = None,
        max_cg_iter: int = 1000,
        em_form: str = "auto",
        random_state: int | torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> None:
        self.n_clusters = n_clusters
        self.method = method
        self.mode = mode
        self.num_probes = num_probes
        self.max_iter = max_iter
        self.tol = tol
        self.noise_precision = noise_precision
        self.alpha_init = alpha_init
        self.noise_precision_init = noise_precision_init
        self.shared_probes = shared_probes
        self.cg_tol = cg_tol
        self.max_cg_iter = max_cg_iter
        self.em_form = em_form
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.progress = progress

    def _check_hyperparameters(self) -> None:
        check.check_int("n_clusters", self.n_clusters)
        check.check_choice("mode", self.mode, _MODES)
        self._check_em_hyperparameters()

    def fit(self, Phi: Any, Y: Any, masks: Any = None) -> ClusteredMultiTaskCS:
        """Fit to the tasks' measurements ``Y[t] ≈ Φ x_t`` (observed where ``masks[t]`` is 1).

        Parameters
        ----------
        Phi : array, tensor, scipy.sparse matrix or operator, shape (N, D)
            The shared sensing operator.
        Y : array or tensor, shape (T, N)
            Measurements per task; NaN allowed where the mask is 0.
        masks : array or tensor of 0/1 or bool, shape (T, N), optional
            Observed entries per task.

        Returns
        -------
        self
        """
        self._check_hyperparameters()
        dtype = check.resolve_dtype(self.dtype, Y, Phi)
        device = check.resolve_device(self.device, Y, Phi)
        y = check.as_float_tensor("Y", Y, dtype, device)
        op = check.resolve_operator("Phi", Phi, dtype, device)
        mask = check.check_data("Y", y, int(op.shape[0]), masks, "masks", (2,))
        n_tasks = y.shape[0]
        if self.mode == "clustered" and self.n_clusters > n_tasks:
            raise ValueError(f"n_clusters={self.n_clusters} exceeds the number of tasks {n_tasks}")
        target = y if mask is None else torch.where(mask > 0, y, torch.zeros_like(y))
        batch = SBLBatch(y=target, mask=mask)
        generator = check.make_generator(self.random_state, device)
        params = self._initial_params(batch, int(op.shape[1]))
        model = CMTCSModel(op, learn_noise=self.noise_precision is None)
        first_resp = self._initial_responsibilities(n_tasks, generator, dtype, device)

        def mstep(p: CMTCSParams, stats: PosteriorMoments, iteration: int) -> CMTCSParams:
            resp = first_resp if iteration == 0 else None
            return model.m_step(p, batch, stats, responsibilities=resp)

        params, stats, history = run_em(
            self._make_estep(model, batch, params, generator, (0,) if self.shared_probes else ()),
            mstep,
            params,
            self.max_iter,
            tol=self.tol,
            progress=self.progress,
            desc=f"CMTCS ({self.method}, {self.mode})",
            loglik=lambda p, s: model.mixture_loglik(p, s.loglik),
        )
        self._store(model, params, stats, history, batch)
        return self

    def _initial_params(self, batch: SBLBatch, n_latent: int) -> CMTCSParams:
        y = batch.y
        shape = {
            "clustered": (self.n_clusters, 1, n_latent),
            "joint": (1, 1, n_latent),
            "separate": (1, y.shape[0], n_latent),
        }[self.mode]
        alpha = torch.full(shape, float(self.alpha_init), dtype=y.dtype, device=y.device)
        beta = self._initial_noise_precision(y, batch.mask, (0, 1), (1, 1, 1))
        log_weights = torch.full((shape[0],), -math.log(shape[0]), dtype=y.dtype, device=y.device)
        return CMTCSParams(alpha=alpha, noise_precision=beta, log_weights=log_weights)

    def _initial_responsibilities(
        self, n_tasks: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
    ) -> Tensor | None:
        """Dirichlet(1) responsibilities ``(C, T)`` for the first M-step (clustered mode): at
        equal initial profiles every cluster explains every task equally, so EM needs an
        asymmetric start."""
        if self.mode != "clustered" or self.n_clusters == 1:
            return None
        u = torch.rand((self.n_clusters, n_tasks), generator=generator, device=device)
        e = -torch.log(u.to(dtype).clamp_min(torch.finfo(dtype).tiny))
        return e / e.sum(0, keepdim=True)

    def _store(
        self,
        model: CMTCSModel,
        params: CMTCSParams,
        stats: PosteriorMoments,
        history: list[dict[str, Any]],
        batch: SBLBatch,
    ) -> None:
        n_tasks = batch.y.shape[0]
        tasks = torch.arange(n_tasks, device=stats.mean.device)
        resp = model.responsibilities(params, stats.loglik)  # (C', T)
        if self.mode == "separate":
            self.labels_ = tasks
            self.responsibilities_ = torch.eye(n_tasks, dtype=resp.dtype, device=resp.device)
            self.weights_ = torch.full(
                (n_tasks,), 1.0 / n_tasks, dtype=resp.dtype, device=resp.device
            )
            self.alpha_ = params.alpha[0]
        else:
            self.labels_ = resp.argmax(0)
            self.responsibilities_ = resp.mT
            self.weights_ = params.log_weights.exp()
            self.alpha_ = params.alpha[:, 0]
        cluster = resp.argmax(0)
        self.coef_ = stats.mean[cluster, tasks]
        self.posterior_variance_ = stats.variance[cluster, tasks]
        self.mixture_coef_ = (resp[..., None] * stats.mean).sum(0)
        self.noise_precision_ = params.noise_precision.reshape(())
        self.loglik_ = model.mixture_loglik(params, stats.loglik)
        self.history_ = history
        self.n_iter_ = len(history)
        self.operator_ = model.design
        self.model_ = model
        self._params, self._posterior, self._batch = params, stats, batch

    def predict(self, Phi: Any = None, return_std: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Predict each task's measurements ``y*_t = Φ* x_t`` under the mixture posterior.

        With responsibilities ``r_ct``, cluster posteriors ``N(μ_ct, Σ_ct)`` and rows ``φ_j``
        of ``Φ*``:

        .. math::

            m_{tj} = \\sum_c r_{ct}\\, \\varphi_j^\\top\\mu_{ct},\\qquad
            v_{tj} = \\beta^{-1} + \\sum_c r_{ct}\\big[\\varphi_j^\\top\\Sigma_{ct}\\varphi_j
            + (\\varphi_j^\\top\\mu_{ct} - m_{tj})^2\\big],

        the mean and variance of the predictive mixture (law of total variance; a sum of
        non-negative terms, no cancellation). ``φ_jᵀΣ_ctφ_j`` is exact: Cholesky for
        ``method="em"``, one CG solve per row, cluster and task for ``"cofem"``.

        Parameters
        ----------
        Phi : array, tensor, scipy.sparse matrix or operator, shape (M, D), optional
            New rows of the design; default the fitted ``Φ``, whose rows outside each task's
            mask are then predicted.
        return_std : bool
            Also return the predictive standard deviations (noise included).

        Returns
        -------
        y_mean : Tensor, shape (T, M)
            ``Φ* mixture_coef_`` (the Bayes estimate; ``coef_`` is the assigned cluster's).
        y_std : Tensor, shape (T, M)
            Only with ``return_std``.
        """
        self._check_fitted()
        op = self._prediction_operator(Phi, self.mixture_coef_)
        mean = op(self.mixture_coef_)
        if not return_std:
            return mean
        params, stats = self._params, self._posterior
        lg = self.model_.linear_gaussian(params, self._batch)
        quad = self._posterior_quadratic_forms(lg, op)  # (C', T, M)
        resp = self.model_.responsibilities(params, stats.loglik)[..., None]  # (C', T, 1)
        spread = (op(stats.mean) - mean) ** 2
        var = (resp * (quad + spread)).sum(0) + 1.0 / params.noise_precision.reshape(())
        return mean, var.sqrt()

    def to_pyro(self) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
        """The fitted model as pyro ``(model_fn, guide_fn)``.

        ``model_fn(Y=None, masks=None)``: in ``pyro.plate("tasks", T)``, a label (site
        ``"label"``, ``Categorical(π)``; absent in the joint and separate modes), the signal
        (site ``"x"``, ``Normal(0, α_label^{-1/2})``) and the masked measurements (site ``"y"``).
        Its log-joint equals :meth:`CMTCSModel.complete_loglik` with labels. ``guide_fn``
        draws the label from the responsibilities and ``x`` from that cluster's mean-field
        posterior.
        """
        import pyro
        import pyro.distributions as dist

        self._check_fitted()
        op, params, stats = self.operator_, self._params, self._posterior
        n_tasks = self._batch.y.shape[0]
        mixture = self.mode == "clustered"
        alpha = params.alpha.expand(-1, n_tasks, -1)  # (C', T, D)
        noise_scale = params.noise_precision.reshape(()).rsqrt()
        resp = self.model_.responsibilities(params, stats.loglik).mT  # (T, C')
        tasks = torch.arange(n_tasks, device=alpha.device)

        def model_fn(Y: Tensor | None = None, masks: Tensor | None = None) -> Tensor:
            with pyro.plate("tasks", n_tasks):
                label = torch.zeros(n_tasks, dtype=torch.long, device=alpha.device)
                if mixture:
                    label = pyro.sample("label", dist.Categorical(logits=params.log_weights))
                scale = alpha[label, tasks].rsqrt()
                x = pyro.sample("x", dist.Normal(torch.zeros_like(scale), scale).to_event(1))
                loc = op(x)
                lik = dist.Normal(loc, noise_scale.expand(loc.shape))
                if masks is not None:
                    keep = torch.as_tensor(masks).bool()
                    lik = lik.mask(keep)
                    if Y is not None:
                        Y = torch.where(keep, Y, torch.zeros_like(Y))
                pyro.sample("y", lik.to_event(1), obs=Y)
            return x

        def guide_fn(Y: Tensor | None = None, masks: Tensor | None = None) -> Tensor:
            with pyro.plate("tasks", n_tasks):
                label = torch.zeros(n_tasks, dtype=torch.long, device=alpha.device)
                if mixture:
                    label = pyro.sample("label", dist.Categorical(probs=resp))
                loc = stats.mean[label, tasks]
                scale = stats.variance[label, tasks].sqrt()
                return pyro.sample("x", dist.Normal(loc, scale).to_event(1))

        return model_fn, guide_fn


def demo(out_dir: str | Path, random_state: int = 0) -> list[dict[str, Any]]:
    """CMTCS demo: EM vs CoFEM (clustered) and CoFEM separate, D=128, T=12, C=2, 25% observed
    DCT, 5% support per cluster, σ=0.05, 30 iterations (a few seconds).

    Writes ``cmtcs_reconstruction.png`` (task 0) to ``out_dir`` and returns one table row per
    fit (``method``, ``mode``, ``seconds``, ``nmse``, ``rel_error``, ``accuracy``).
    """
    from probunroll.data.synthetic import make_cmtcs_problem
    from probunroll.models._plot import plot_reconstruction

    prob = make_cmtcs_problem(128, 12, 2, random_state=random_state)
    beta = 1.0 / prob.noise_std**2
    rows, fits = [], {}
    for method, mode in (("em", "clustered"), ("cofem", "clustered"), ("cofem", "separate")):
        est = ClusteredMultiTaskCS(
            2,
            method,
            mode=mode,
            max_iter=30,
            noise_precision=beta,
            random_state=random_state,
            progress=False,
        )
        start = time.perf_counter()
        est.fit(prob.Phi, prob.Y, masks=prob.masks)
        seconds = time.perf_counter() - start
        nmse = float(((est.coef_ - prob.X) ** 2).sum() / (prob.X**2).sum())
        accuracy = cluster_accuracy(est.labels_, prob.labels) if mode == "clustered" else None
        rows.append(
            {
                "model": "CMTCS",
                "method": method,
                "mode": mode,
                "seconds": seconds,
                "nmse": nmse,
                "rel_error": nmse**0.5,
                "accuracy": accuracy,
            }
        )
        fits[f"{method} ({mode})"] = est.coef_[0]
    plot_reconstruction(
        Path(out_dir) / "cmtcs_reconstruction.png", prob.X[0], fits, "CMTCS, task 0"
    )
    return rows


def cluster_accuracy(labels: Tensor, truth: Tensor) -> float:
    """Fraction of tasks whose label matches the truth under the best one-to-one relabelling
    (Hungarian algorithm on the confusion matrix)."""
    from scipy.optimize import linear_sum_assignment

    labels, truth = labels.cpu().long(), truth.cpu().long()
    n = int(max(int(labels.max()), int(truth.max()))) + 1
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((labels, truth), torch.ones_like(labels), accumulate=True)
    rows, cols = linear_sum_assignment(confusion.numpy(), maximize=True)
    return float(confusion[rows, cols].sum()) / labels.numel()
