"""The EM loop shared by the estimators: alternate E- and M-steps, record ``history_``.

One host synchronisation per EM iteration (to log the iteration's numbers); none inside the
E-step's solver.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from probunroll._errors import NumericalWarning
from probunroll.models.base import PosteriorMoments

EStep = Callable[[Any, PosteriorMoments | None], PosteriorMoments]
MStep = Callable[[Any, PosteriorMoments, int], Any]


def _progress_bar(total: int, progress: bool, desc: str) -> Any:
    """A tqdm bar that is silent off a TTY (``disable=None``), or None without tqdm."""
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, desc=desc, disable=None, leave=False)


def _record(
    iteration: int, seconds: float, stats: PosteriorMoments, loglik: torch.Tensor | None
) -> dict[str, Any]:
    """One ``history_`` row (a single device-to-host transfer)."""
    row: dict[str, Any] = {"iteration": iteration, "seconds": seconds}
    values = {}
    if loglik is not None:
        values["loglik"] = loglik
    if stats.cg_iterations is not None:
        values["cg_iterations"] = stats.cg_iterations.max().to(stats.mean.dtype)
        values["converged"] = stats.converged.all().to(stats.mean.dtype)
        values["cg_residual"] = stats.cg_residual.max()
    if values:
        numbers = torch.stack(list(values.values())).tolist()
        row.update(zip(values, numbers, strict=True))
    if "cg_iterations" in row:
        row["cg_iterations"] = int(row["cg_iterations"])
        row["converged"] = bool(row["converged"])
    else:
        row["converged"] = True
    return row


def _total_loglik(_params: Any, stats: PosteriorMoments) -> torch.Tensor | None:
    return None if stats.loglik is None else stats.loglik.sum()


def mean_change(old: PosteriorMoments, new: PosteriorMoments) -> torch.Tensor:
    """Largest relative change of a posterior mean, ``max_s ‖μ_s′ − μ_s‖ / ‖μ_s‖`` (0-d).

    The norm runs over the latent (last) dimension, the maximum over every other one, so one
    slowly converging vector of a batch keeps the loop going; an all-zero ``μ_s`` divides by 1.
    """
    size = torch.linalg.vector_norm(old.mean, dim=-1)
    step = torch.linalg.vector_norm(new.mean - old.mean, dim=-1)
    return (step / torch.where(size > 0, size, torch.ones_like(size))).max()


def run_em(
    estep: EStep,
    mstep: MStep,
    params: Any,
    max_iter: int,
    *,
    progress: bool = True,
    desc: str = "EM",
    loglik: Callable[[Any, PosteriorMoments], torch.Tensor] | None = None,
    tol: float | None = None,
) -> tuple[Any, PosteriorMoments, list[dict[str, Any]]]:
    """Run EM iterations until ``tol`` is met or ``max_iter`` are done, then a final E-step
    at the last parameters.

    Parameters
    ----------
    estep : callable ``(params, previous_stats) -> PosteriorMoments``
        The E-step; ``previous_stats`` (None at first) allows warm starts.
    mstep : callable ``(params, stats, iteration) -> params``
        The M-step.
    params
        Initial parameters.
    max_iter : int
        Number of EM iterations (E-step then M-step).
    progress : bool
        Show a tqdm bar (only on a TTY).
    desc : str
        Label of the bar.
    loglik : callable ``(params, stats) -> Tensor``, optional
        The log-likelihood to record (0-d); default: the sum of ``stats.loglik`` over the
        batch, when the E-step gives one.
    tol : float, optional
        Stop after the first iteration whose M-step moves every posterior mean by at most
        ``tol`` relative to its norm (:func:`mean_change`, recorded in ``history`` as
        ``mean_change``). ``None`` runs all ``max_iter`` iterations. With CoFEM the means carry
        the CG error, so ``tol`` below ``cg_tol`` may never be met.

    Returns
    -------
    params, stats, history
        The final parameters, the posterior moments at them, and one dict per iteration with
        ``iteration``, cumulative ``seconds``, ``loglik`` (the log-likelihood at the iteration's
        parameters, before its M-step), ``cg_iterations`` (most over the batch),
        ``converged`` and ``cg_residual`` (worst relative residual) where they apply, and
        ``mean_change`` when ``tol`` is set.

    Warns
    -----
    NumericalWarning
        If CG missed its tolerance in some E-step (the fit still completes).
    """
    history: list[dict[str, Any]] = []
    bar = _progress_bar(max_iter, progress, desc)
    start = time.perf_counter()
    stats = estep(params, None)
    for iteration in range(max_iter):
        value = _total_loglik(params, stats) if loglik is None else loglik(params, stats)
        history.append(_record(iteration, time.perf_counter() - start, stats, value))
        params = mstep(params, stats, iteration)
        previous, stats = stats, estep(params, stats)
        done = False
        if tol is not None:
            history[-1]["mean_change"] = change = float(mean_change(previous, stats))
            done = change <= tol
        if bar is not None:
            bar.update(1)
            if "loglik" in history[-1]:
                bar.set_postfix(loglik=f"{history[-1]['loglik']:.4g}")
        if done:
            break
    if bar is not None:
        bar.close()
    missed = [row for row in history if not row["converged"]]
    if missed:
        worst = max(row["cg_residual"] for row in missed)
        warnings.warn(
            f"CG missed its tolerance in {len(missed)} of {len(history)} E-steps "
            f"(worst relative residual {worst:.2e}); raise max_cg_iter or cg_tol",
            NumericalWarning,
            stacklevel=3,
        )
    return params, stats, history
