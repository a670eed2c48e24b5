"""The minibatch optimizer loop shared by gradient EM and probabilistic unrolling.

Both methods maximise the marginal log-likelihood ``Σ_n log p_θ(ỹ_n)`` by stochastic gradient
ascent on a per-batch surrogate whose gradient estimates ``∇θ log p_θ(ỹ_n)`` (exactly, by the
Fisher identity, for gradient EM; by Monte Carlo and an unrolled solver for probabilistic
unrolling). Keeping one loop for both means the same optimizer, learning-rate schedule,
minibatches and stopping rule, so a comparison isolates the E-step (Lin et al., ICML 2023,
arXiv:2306.03249, §5).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: The INFO line ``run_epochs`` logs at each monitored epoch (method, epoch, fit seconds,
#: monitored log-likelihood), and the pattern that reads it back (``benchmarks/plot_curves.py``
#: draws runs stopped before they wrote their JSON from their logs). Change them together.
MONITOR_LOG_FORMAT = "%s: epoch %d, %.1f s, loglik %.8g"
MONITOR_LOG_PATTERN = re.compile(r"(\S+): epoch (\d+), ([\d.]+) s, loglik (\S+)$")

__all__ = ["BestIterate", "GraphedStep", "best_iteration", "fit_stochastic", "make_optimizer"]

Params = dict[str, Tensor]
Objective = Callable[[Params, tuple[Tensor, ...], torch.Generator | None], tuple[Tensor, dict]]


def make_optimizer(
    optimizer: Any,
    leaves: Sequence[Tensor] | Sequence[dict[str, Any]],
    lr: float,
) -> torch.optim.Optimizer:
    """Build a torch optimizer: ``"adam"``, ``"sgd"``, ``"adamw"``, an optimizer class, or a
    callable ``(leaves, lr) -> Optimizer``. ``leaves`` may be torch parameter groups
    (``[{"params": [...], "lr": ...}, ...]``), as torch's optimizers take them."""
    named = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if isinstance(optimizer, str):
        if optimizer.lower() not in named:
            raise ValueError(
                f"optimizer must be one of {sorted(named)} or a callable, got {optimizer!r}"
            )
        optimizer = named[optimizer.lower()]
    if not callable(optimizer):
        raise ValueError(f"optimizer must be a name or a callable, got {type(optimizer).__name__}")
    return optimizer(list(leaves), lr=lr)


def fit_stochastic(
    objective: Objective,
    params: Params,
    data: tuple[Tensor, ...],
    *,
    batch_size: int = 256,
    max_epochs: int = 100,
    optimizer: Any = "adam",
    lr: float = 1e-2,
    lr_schedule: Callable[[torch.optim.Optimizer], Any] | None = None,
    monitor: Callable[[Params], float] | None = None,
    monitor_every: int = 1,
    tol: float | None = 1e-5,
    patience: int = 3,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    desc: str = "fit",
    max_seconds: float | None = None,
    cuda_graph: bool = False,
    graph_state: Sequence[Tensor] = (),
    average: float | None = None,
    clip_spikes: float | None = None,
    restore_best: bool = False,
    best_state: Callable[[], Sequence[Tensor | None]] | None = None,
    project: Callable[[Params], None] | None = None,
    epoch_fields: Callable[[Params], dict[str, Any]] | None = None,
    on_monitor: Callable[[dict[str, Any], Params], None] | None = None,
    param_lr: dict[str, float] | None = None,
    fixed: Sequence[str] = (),
) -> tuple[Params, list[dict[str, Any]]]:
    """Maximise ``objective`` by minibatch stochastic gradient ascent.

    Parameters
    ----------
    objective : callable ``(params, batch, generator) -> (value, info)``
        ``value`` is a scalar whose gradient estimates the mean over the batch of
        ``∇θ log p_θ(ỹ_n)``; ``info`` may hold ``cg_iterations`` and ``converged`` tensors.
    params : dict of Tensor
        Initial unconstrained parameters; copied, never modified.
    data : tuple of Tensor
        Per-point tensors sharing the first dimension (n, ...); minibatches index them all.
    batch_size, max_epochs : int
        Minibatch size and number of passes over the data (one ``history`` entry per pass).
    optimizer : str, optimizer class or callable
        See :func:`make_optimizer`; Adam by default.
    lr : float
        Learning rate.
    param_lr : dict, optional
        ``{name: rate}``: parameters with their own learning rate (each its own optimizer
        parameter group; the rest at ``lr``). ``lr_schedule`` scales every group alike. E.g.
        a faster rate on a noise precision, whose Adam path at the shared rate can lag the
        rest of the fit (SparseBayesianDictionaryLearning ``noise_lr``).
    fixed : sequence of str
        Parameters kept out of the optimizer: no gradient is formed for them and only
        ``project`` changes them, e.g. a closed-form (coordinate-wise EM) step for a noise
        precision between gradient steps on the rest (SparseBayesianDictionaryLearning
        ``noise_update="em"`` or ``"mackay"``).
    lr_schedule : callable, optional
        ``optimizer -> scheduler``; the scheduler is stepped once per epoch.
    monitor : callable, optional
        ``params -> float``: a log-likelihood per point (held-out, or a fixed training subset),
        evaluated after every ``monitor_every``-th epoch and after the last; its time is not
        counted in ``seconds``.
    monitor_every : int
        Evaluate the monitor every this many epochs (and after the last one). The monitor
        costs a full exact evaluation, about one unrolled epoch on large models: a larger
        value saves wall time; the epochs in between get no ``loglik``.
    tol, patience : float, int
        Stop once the monitored log-likelihood changed by less than ``tol`` (relative) for
        ``patience`` monitored epochs in a row. ``tol=None`` runs all epochs.
    generator : torch.Generator, optional
        Drives the minibatch order and the objective's random draws. The order comes from a
        separate stream seeded once from ``generator``, so every objective (exact or Monte
        Carlo, whatever it draws) sees the same minibatches for the same seed.
    progress : bool or None
        tqdm progress bar; None shows it only on a terminal.
    desc : str
        Progress-bar label.
    max_seconds : float, optional
        Stop after the epoch during which the fitting time passed this budget.
    cuda_graph : bool
        CUDA data only: capture one full minibatch step (gather, objective, backward) as a CUDA
        graph once and replay it for every full minibatch (:class:`GraphedStep`); the
        optimizer step and a last partial minibatch run eagerly. Removes the per-kernel launch
        and Python cost that dominates small solver steps on a GPU. The objective must not
        synchronise with the host (the library's CG, perturbation draws and FA posteriors skip
        their host checks while capturing) and must have no host-side effects; its random
        draws come from the default CUDA generator, which is seeded from ``generator`` before
        the capture (:func:`seed_capture_generator`; ``generator`` also orders the
        minibatches), so a graphed fit is reproducible from its seed. Each epoch's objective
        is checked finite on the host instead.
    graph_state : sequence of Tensor
        Tensors the objective writes in place (per-point caches such as SBL's α_t): restored
        after the capture's eager warm-up runs, so that replays start from the eager state.
    average : float in [0, 1), optional
        Iterate averaging: the monitor sees, and the fit returns, the exponential moving
        average of the parameters over optimizer steps, ``θ̄_s = (1 − γ^s)⁻¹ Σ_{r≤s}
        (1 − γ) γ^{s−r} θ_r`` with ``γ = average`` (bias-corrected as Adam's moments, so it
        does not lean on the initial point); the optimizer itself steps the raw iterate. It
        damps the gradient noise that keeps SGD ``O(lr)`` away from the optimum (Polyak &
        Juditsky 1992; the exponential window of Izmailov et al. 2018's SWA), at the cost of a
        lag of about ``γ/(1 − γ)`` steps while the fit still moves. None: the raw iterate.
    clip_spikes : float > 1, optional
        Rescale a step's gradient whose norm exceeds ``clip_spikes`` times the running RMS of
        the past (clipped) gradient norms down to that bound (:class:`SpikeClipper`). A Monte
        Carlo gradient is heavy-tailed where a posterior is nearly singular in some direction,
        and one such draw (10³× the usual norm) sends Adam, whose second moment has a 1000-step
        memory, tens of learning rates off in a few steps. None: no clipping. The history
        counts the clipped steps per epoch (``clipped``).
    restore_best : bool
        Return the parameters of the monitored epoch with the highest ``loglik`` (the
        monitor's own parameters: averaged with ``average``) instead of the last ones; the
        history still runs to the last epoch, and the best epoch's row gets ``best: True``. Needs a
        ``monitor``. A copy of the parameters is kept at every new best (one extra parameter
        set in memory). Early stopping's "restore the best weights" (Prechelt, "Early
        stopping — but when?", 1998): a stochastic fit can leave its optimum late
        (SparseBayesianDictionaryLearning's unrolled fits, README).
    best_state : callable, optional
        With ``restore_best``: ``() -> tensors`` the objective updates in place (per-point
        hyperparameters, warm starts; None entries are skipped), copied with each new best
        and written back in place at the end, so that they match the returned parameters.
    project : callable, optional
        ``params -> None``: called after every optimizer step (under ``no_grad``) to put the
        parameters back into their feasible set in place, e.g. a floor on a noise variance
        (projected gradient ascent), and to step the ``fixed`` ones (the leaves are updated in
        place). None: unconstrained.
    epoch_fields : callable, optional
        ``params -> {name: value}``: model diagnostics recorded in each epoch's history row
        after its last step (under ``no_grad``; 0-d tensors become floats), e.g. the noise
        precision a fit is driving up.
    on_monitor : callable, optional
        ``(row, params) -> None``, called after each monitored epoch with its history row
        (``loglik`` included) and the parameters the monitor saw (live tensors: copy what you
        keep): checkpoints, or a slower evaluation of the same states outside the fit. Its
        time is not counted in ``seconds``. See :func:`run_epochs`.

    Returns
    -------
    params : dict of Tensor
        Fitted parameters (detached; the averaged ones with ``average``).
    history : list of dict
        Per epoch: ``iteration``, ``seconds`` (cumulative, monitor excluded), ``loglik``
        (on monitored epochs), ``objective`` (mean surrogate value), ``cg_iterations`` (mean solver
        steps per system, where a solver ran), ``converged``, ``lr`` and, with
        ``clip_spikes``, ``clipped``, plus the ``epoch_fields``.
    """
    n = data[0].shape[0]
    device = data[0].device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs data on a CUDA device, got {device}")
    if average is not None and (
        isinstance(average, bool) or not isinstance(average, float | int) or not 0 <= average < 1
    ):
        raise ValueError(f"average must be a float in [0, 1) or None, got {average!r}")
    if restore_best and monitor is None:
        raise ValueError("restore_best needs a monitor: the best epoch is the monitored one")
    unknown = sorted(set(fixed) - set(params))
    if unknown:
        raise ValueError(f"fixed names unknown parameters {unknown}; known: {sorted(params)}")
    if not set(params) - set(fixed):
        raise ValueError("fixed holds every parameter: nothing is left for the optimizer")
    clash = sorted(set(fixed) & set(param_lr or {}))
    if clash:
        raise ValueError(f"parameters {clash} are fixed, so param_lr cannot give them a rate")
    leaves = {k: v.detach().clone().requires_grad_(k not in fixed) for k, v in params.items()}
    clipper = None if clip_spikes is None else SpikeClipper(clip_spikes, device)
    sums = {k: torch.zeros_like(v) for k, v in leaves.items()} if average is not None else {}
    steps = 0

    def current() -> Params:
        """The parameters the monitor sees and the fit returns (averaged with ``average``)."""
        if average is None:
            return {k: v.detach() for k, v in leaves.items()}
        weight = 1.0 - float(average) ** steps
        return {k: (v / weight) for k, v in sums.items()}

    trained = {k: v for k, v in leaves.items() if k not in fixed}
    opt = make_optimizer(optimizer, _param_groups(trained, param_lr), lr)
    scheduler = lr_schedule(opt) if lr_schedule is not None else None
    graphed: GraphedStep | None = None
    order_gen = torch.Generator(device="cpu")
    if generator is not None:
        order_gen.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    else:
        order_gen.seed()

    def epoch_step(epoch: int) -> tuple[Params, dict[str, Any]]:
        nonlocal graphed, steps
        order = torch.randperm(n, generator=order_gen, device="cpu").to(device)
        values, cg_iters, cg_ok, clipped = [], [], [], []
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            if cuda_graph and idx.shape[0] == batch_size:
                if graphed is None:
                    if generator is not None:
                        seed_capture_generator(generator, device)
                    graphed = GraphedStep(objective, leaves, data, idx, state=graph_state)
                value, info = graphed(idx)
            else:
                batch = tuple(t[idx] for t in data)
                opt.zero_grad(set_to_none=True)
                value, info = objective(leaves, batch, generator)
                (-value).backward()
            if clipper is not None:
                clipped.append(clipper(leaves.values()))
            opt.step()
            if project is not None:
                with torch.no_grad():
                    project(leaves)
            if average is not None:
                with torch.no_grad():
                    for k, v in leaves.items():
                        sums[k].lerp_(v, 1 - average)
                steps += 1
            values.append(value.detach().clone())  # a graph's output is overwritten on replay
            if "cg_iterations" in info:
                cg_iters.append(info["cg_iterations"].float().mean())
                cg_ok.append(info["converged"].all())
        if scheduler is not None:
            scheduler.step()
        fields: dict[str, Any] = {
            "objective": torch.stack(values).mean(),
            "lr": opt.param_groups[0]["lr"],
        }
        if cg_iters:
            fields["cg_iterations"] = torch.stack(cg_iters).mean()
            fields["converged"] = torch.stack(cg_ok).all()
        if clipped:
            fields["clipped"] = torch.stack(clipped).sum()
        if epoch_fields is not None:
            with torch.no_grad():
                fields.update(epoch_fields(leaves))
        if graphed is not None and not bool(torch.isfinite(fields["objective"])):
            raise FloatingPointError(
                f"epoch {epoch}: the captured minibatch step gave a non-finite objective "
                "(CG breakdown or a failed Cholesky, unchecked while the graph replays); "
                "rerun with cuda_graph=False to see where"
            )
        return current(), fields

    best = BestIterate(monitor, best_state) if restore_best else None  # monitor checked above
    history = run_epochs(
        epoch_step,
        max_epochs=max_epochs,
        device=device,
        monitor=monitor if best is None else best,
        monitor_every=monitor_every,
        tol=tol,
        patience=patience,
        max_seconds=max_seconds,
        desc=desc,
        progress=progress,
        on_monitor=on_monitor,
    )
    if best is None:
        return current(), history
    return best.restore(current(), history), history


def check_rate(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive number (a learning rate; not a
    bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _param_groups(
    leaves: dict[str, Tensor], param_lr: dict[str, float] | None
) -> list[Tensor] | list[dict[str, Any]]:
    """The leaves, or torch parameter groups when ``param_lr`` gives some their own rate."""
    if not param_lr:
        return list(leaves.values())
    unknown = sorted(set(param_lr) - set(leaves))
    if unknown:
        raise ValueError(f"param_lr names unknown parameters {unknown}; known: {sorted(leaves)}")
    for name, rate in param_lr.items():
        check_rate(f"param_lr[{name!r}]", rate)
    rest = [v for k, v in leaves.items() if k not in param_lr]
    groups = [{"params": rest}] if rest else []
    return groups + [{"params": [leaves[k]], "lr": float(r)} for k, r in param_lr.items()]


def best_iteration(history: Sequence[dict[str, Any]]) -> int:
    """The ``iteration`` of the row :meth:`BestIterate.restore` marked ``best``, else the
    last row's (what a fitted estimator's ``best_iteration_`` reports)."""
    kept = [row["iteration"] for row in history if row.get("best")]
    return kept[0] if kept else history[-1]["iteration"]


class BestIterate:
    """A monitor that keeps a copy of the parameters (and of ``state()``'s tensors) at the
    highest finite value it has returned (``index``: which call), for
    ``fit_stochastic(restore_best=True)`` and loops like it (EM with a held-out monitor)."""

    def __init__(
        self,
        monitor: Callable[[Params], float],
        state: Callable[[], Sequence[Tensor | None]] | None,
    ) -> None:
        self.monitor, self.state = monitor, state
        self.value = -math.inf
        self.params: Params | None = None
        self.saved: list[Tensor | None] = []
        self.index, self.calls = -1, 0

    def __call__(self, params: Params) -> float:
        value = float(self.monitor(params))
        if math.isfinite(value) and value > self.value:
            self.value, self.index = value, self.calls
            self.params = {k: v.detach().clone() for k, v in params.items()}
            live = () if self.state is None else self.state()
            self.saved = [None if t is None else t.detach().clone() for t in live]
        self.calls += 1
        return value

    def restore(self, last: Params, history: list[dict[str, Any]]) -> Params:
        """The best parameters (``last`` if no monitored value was finite), with the saved
        state written back into the live tensors in place and the best monitored row of
        ``history`` marked ``best: True``."""
        if self.params is None:
            return last
        if self.state is not None:
            with torch.no_grad():
                for t, saved in zip(self.state(), self.saved, strict=True):
                    if t is not None and saved is not None:
                        t.copy_(saved)
        [row for row in history if "loglik" in row][self.index]["best"] = True
        return self.params


def check_clip_spikes(value: object) -> None:
    """``clip_spikes`` must be None or a number above 1 (the bound is a multiple of the RMS)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, float | int) or not value > 1:
        raise ValueError(f"clip_spikes must be a number > 1 or None, got {value!r}")


class SpikeClipper:
    """Clip gradient spikes relative to the running scale of the gradient norm.

    At step s with total gradient norm ``g_s = ‖(∇θ_1, ∇θ_2, …)‖``, past the first ``warmup``
    steps the gradients are scaled by ``min(1, c·r_s/g_s)``, with ``r_s`` the bias-corrected
    exponential moving RMS of the clipped norms before step s,
    ``r_s² = (1 − γ^s)⁻¹ Σ_{j<s} (1 − γ) γ^{s−1−j} ĝ_j²``. Feeding the clipped norms ``ĝ`` into
    ``r`` keeps a spike from raising the bound it is measured against. Everything stays on the
    gradients' device (no host synchronisation), so it runs between CUDA graph replays.
    Gradient clipping by norm: Pascanu, Mikolov & Bengio (ICML 2013); a bound that follows the
    history of norms: Seetharaman et al., "AutoClip" (MLSP 2020).

    Parameters
    ----------
    factor : float > 1
        ``c``.
    device : torch.device
    decay : float in (0, 1)
        ``γ`` (0.99: a memory of about 100 steps).
    warmup : int
        Steps that only feed the running RMS.

    ``__call__(leaves)`` clips the leaves' ``.grad`` in place and returns a 0-d tensor, 1 where
    it clipped. A step with a non-finite norm is neither clipped nor counted in ``r``.
    """

    def __init__(
        self, factor: float, device: torch.device, decay: float = 0.99, warmup: int = 20
    ) -> None:
        check_clip_spikes(factor)
        self.factor, self.decay, self.warmup = float(factor), decay, warmup
        self.mean_square = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    @torch.no_grad()
    def __call__(self, leaves: Any) -> Tensor:
        grads = [p.grad for p in leaves if p.grad is not None]
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g).to(torch.float64) for g in grads])
        )
        finite = torch.isfinite(norm)  # a non-finite step is left to the caller's checks
        hit = torch.zeros((), dtype=torch.float64, device=norm.device)
        if self.steps >= self.warmup:
            rms = (self.mean_square / (1.0 - self.decay**self.steps)).sqrt()
            scale = torch.where(finite, (self.factor * rms / norm).clamp(max=1.0), 1.0)
            hit = (scale < 1.0).to(torch.float64)
            for g in grads:
                g.mul_(scale.to(g.dtype))
            norm = norm * scale
        updated = torch.lerp(self.mean_square, norm.square(), 1.0 - self.decay)
        self.mean_square = torch.where(finite, updated, self.mean_square)
        self.steps += 1
        return hit


def seed_capture_generator(generator: torch.Generator, device: torch.device) -> None:
    """Seed ``device``'s default CUDA generator from ``generator``.

    A captured CUDA graph can only draw from the default generator of the device current at
    capture (PyTorch's graph-safe Philox state; a user generator is refused there), so a
    graphed fit takes its random stream from that generator: seeding it from the fit's own
    ``generator`` makes two graphed fits with the same seed draw the same numbers. Replays then
    advance its offset, one step's worth each.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.default_generators[index].manual_seed(seed)


class GraphedStep:
    """One minibatch step of :func:`fit_stochastic` captured as a CUDA graph and replayed.

    The captured work is: gather the minibatch ``data[i][idx]`` from a static index buffer,
    evaluate ``objective(leaves, batch, None)`` and backpropagate ``-value`` into the leaves'
    ``.grad``. Capture follows PyTorch's whole-network recipe: a few eager warm-up runs on a
    side stream, then one capture with the gradients unset so that backward allocates them in
    the graph's memory pool; every replay rewrites those same tensors. Random draws inside
    the objective use the default CUDA generator, whose graph-safe Philox offset advances on
    every replay, so each replay draws fresh numbers (:func:`fit_stochastic` seeds it from the
    fit's generator first, :func:`seed_capture_generator`).

    Parameters
    ----------
    objective : callable ``(params, batch, generator) -> (value, info)``
        Sync-free on the device and without host-side effects.
    leaves : dict of Tensor
        The parameters (leaves requiring grad); updated in place by the optimizer between
        replays, which the graph reads afresh each time.
    data : tuple of Tensor
        Per-point CUDA tensors.
    idx : Tensor (batch_size,)
        A first minibatch's indices (its shape fixes the captured batch size).
    warmup : int
        Eager runs before the capture.
    state : sequence of Tensor
        Tensors the objective updates in place (per-point caches): saved before the warm-up
        runs and restored after the capture, so the warm-up leaves no trace.
    """

    def __init__(
        self,
        objective: Objective,
        leaves: Params,
        data: tuple[Tensor, ...],
        idx: Tensor,
        warmup: int = 2,
        state: Sequence[Tensor] = (),
    ) -> None:
        self.idx = idx.clone()
        saved = [t.clone() for t in state]
        self.leaves = leaves

        def body() -> tuple[Tensor, dict[str, Tensor]]:
            batch = tuple(t.index_select(0, self.idx) for t in data)
            value, info = objective(leaves, batch, None)
            (-value).backward()
            return value.detach(), {k: v for k, v in info.items() if isinstance(v, Tensor)}

        side = torch.cuda.Stream(device=self.idx.device)
        side.wait_stream(torch.cuda.current_stream(self.idx.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                for p in leaves.values():
                    p.grad = None
                body()
        torch.cuda.current_stream(self.idx.device).wait_stream(side)
        for p in leaves.values():
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.value, self.info = body()
        except RuntimeError as err:  # torch.AcceleratorError is one too
            raise RuntimeError(
                "cuda_graph=True: the minibatch step could not be captured as a CUDA graph "
                "(it must not synchronise with the host or allocate outside torch's allocator); "
                f"fit with cuda_graph=False. Cause: {err}"
            ) from err
        self.grads = {k: p.grad for k, p in leaves.items()}
        with torch.no_grad():
            for t, before in zip(state, saved, strict=True):
                t.copy_(before)

    def __call__(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Replay on the minibatch ``idx``; returns the (static) objective value and info, and
        points every leaf's ``.grad`` at its captured gradient."""
        self.idx.copy_(idx)
        self.graph.replay()
        for k, p in self.leaves.items():
            p.grad = self.grads[k]
        return self.value, self.info


def run_epochs(
    step: Callable[[int], tuple[Any, dict[str, Any]]],
    *,
    max_epochs: int,
    device: torch.device,
    monitor: Callable[[Any], float] | None = None,
    monitor_every: int = 1,
    tol: float | None = None,
    patience: int = 3,
    max_seconds: float | None = None,
    desc: str = "fit",
    progress: bool | None = None,
    on_monitor: Callable[[dict[str, Any], Any], None] | None = None,
) -> list[dict[str, Any]]:
    """Drive a fit epoch by epoch and record its ``history``.

    ``step(epoch) -> (params, fields)`` does one epoch (or EM iteration); its wall time, with a
    device synchronisation at the end, accumulates in ``seconds``; the monitor's does not.
    ``fields`` go into the epoch's row (0-d tensors become floats, or bools for a bool tensor,
    after the clock stops). The monitor runs after every ``monitor_every``-th epoch and after
    the last one (its ``loglik`` goes into those rows only). Stops after ``max_epochs``, after
    the epoch that passed ``max_seconds``, or once the monitored ``loglik`` :func:`plateaued`
    over the monitored rows. Shows a tqdm bar (``progress=None``: only on a terminal) and logs
    each monitored value at INFO level to the ``probunroll.inference.stochastic`` logger (for
    runs without a terminal: ``logging.basicConfig(level=logging.INFO)`` shows them).
    ``on_monitor(row, params)`` is called after each monitored epoch (untimed), with the row
    as recorded and the parameters ``step`` returned.
    """
    from tqdm.auto import tqdm

    if isinstance(monitor_every, bool) or not isinstance(monitor_every, int) or monitor_every < 1:
        raise ValueError(f"monitor_every must be a positive integer, got {monitor_every!r}")
    history: list[dict[str, Any]] = []
    elapsed = 0.0
    bar = tqdm(range(max_epochs), desc=desc, disable=None if progress is None else not progress)
    for epoch in bar:
        start = time.perf_counter()
        params, fields = step(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
        entry: dict[str, Any] = {"iteration": epoch, "seconds": elapsed}
        for key, value in fields.items():
            if isinstance(value, Tensor):
                value = bool(value) if value.dtype == torch.bool else float(value)
            entry[key] = value
        out_of_time = max_seconds is not None and elapsed >= max_seconds
        last = out_of_time or epoch == max_epochs - 1
        monitored = monitor is not None and (last or (epoch + 1) % monitor_every == 0)
        if monitored:
            with torch.no_grad():
                entry["loglik"] = float(monitor(params))
            bar.set_postfix(loglik=f"{entry['loglik']:.4g}")
            # for runs without a terminal (CI, nohup): silent unless logging is configured
            logger.info(MONITOR_LOG_FORMAT, desc, epoch, elapsed, entry["loglik"])
        history.append(entry)
        if monitored and on_monitor is not None:
            with torch.no_grad():
                on_monitor(entry, params)
        if out_of_time:
            break
        calm = monitored and tol is not None
        if calm and plateaued([row for row in history if "loglik" in row], tol, patience):
            break
    bar.close()
    return history


def plateaued(history: Sequence[dict[str, Any]], tol: float, patience: int) -> bool:
    """True once the last ``patience`` epochs each changed the monitored ``loglik`` by at most
    ``tol`` relative to the epoch before (``|ℓ_e − ℓ_{e−1}| ≤ tol·|ℓ_{e−1}|``)."""
    values = [row["loglik"] for row in history[-(patience + 1) :]]
    if len(values) < patience + 1:
        return False
    return all(abs(b - a) <= tol * abs(a) for a, b in itertools.pairwise(values))
