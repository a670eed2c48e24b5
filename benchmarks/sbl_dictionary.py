"""Benchmark: sparse Bayesian dictionary learning by probabilistic unrolling vs gradient EM vs
exact EM, on patches of scikit-image's ``data.camera()``.

Signals are p×p patches (N = p² dims, the patch mean removed); the dictionary has D atoms
(D ≥ N: overcomplete), each signal its own ARD prior α_t
(:class:`probunroll.SparseBayesianDictionaryLearning`). The three methods start from the same
initialisation (unit atoms drawn from the signals, one random stream) and are timed in the
same process:

- ``em``: exact EM, closed-form M-step for Φ, β and every α_t (one pass over all signals per
  iteration, O(T N D²) for ``Σ_t E[z_t z_tᵀ]``);
- ``gradient_em``: exact Fisher gradients per minibatch, Adam; the E-step is the cheaper of
  the direct (D×D) and the Woodbury (N×N) posterior per signal — Woodbury here, O(N²D);
- ``unrolled``: K perturb-and-solve samples and I Jacobi-preconditioned CG steps per
  signal, O((K+1)·I·N·D), the same Adam, schedule and minibatches as gradient EM; each
  signal's mean solve starts at its mean from the previous epoch (``--cold-start``: at 0).

Both stochastic methods update α_t by SBL's EM fixed point when the signal is in a minibatch
(exact ``diag Σ`` for gradient EM, the Rao–Blackwellised Monte Carlo estimate for unrolled);
``--alpha-update`` switches a method to MacKay's γ/μ² step (same fixed points).

The monitored value is the exact log-likelihood per signal, ``log p(y_t | Φ, β, α_t)``, on a
fixed subset of the training signals; with ``--heldout H``, on H held-out patches instead,
whose α get ``--heldout-iter`` α steps per epoch like the training signals' (taken at each
monitor, warm-started from the previous one; ``validation_data`` of the estimator), or with
``--heldout-refit R`` are refitted from scratch at each monitor by R α steps
(``validation_refit``: the value is then a function of the current Φ, β alone, where tracked
α keep atoms pruned under an earlier Φ). The monitor's time is not counted. The target is
EM's best value, else the best of any method (flagged); the table reports the time each
method needed to come within 1% (and 0.1%) of it. ``--save-states`` keeps every monitored
dictionary and β (``OUT/states/``, the estimator's ``callback``), so that
``benchmarks/sbl_rescore.py`` can score the same states with more α steps afterwards, on
other cores, without slowing the fits.

Per signal, gradient EM costs ~4N²D flops against unrolled's ~12(K+1)·I·N·D: the ratio grows
with the signal size N, not with D (the Woodbury E-step never forms a D×D matrix), so the
large-N case (32×32 patches, N = 1024) is where the paper's ≥10× should show.

Usage::

    python benchmarks/sbl_dictionary.py --patch 16 --atoms 1024 --n-signals 2048 --max-seconds 300
    python benchmarks/sbl_dictionary.py --device cuda --patch 32 --atoms 1024 2048 4096

Writes ``sbl_dictionary.json``, ``.md`` and ``.png`` into ``--out``.

Reference: Lin, Tolooshams, Atchadé & Ba, ICML 2023, arXiv:2306.03249.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from unrolling import (
    graph_methods,
    markdown,
    parse_budgets,
    plot,
    ratios,
    rows_for,
    save_partial,
    summary,
    target_name,
    time_to,
)

import probunroll as pu

KEY = "loglik"


def camera_signals(patch: int, stride: int, n_signals: int, seed: int) -> np.ndarray:
    """Patches of ``data.camera()`` in [0, 1] with their mean removed, shuffled, (T, p²)."""
    from skimage import data

    img = data.camera().astype(np.float64) / 255.0
    win = np.lib.stride_tricks.sliding_window_view(img, (patch, patch))[::stride, ::stride]
    X = win.reshape(-1, patch * patch)
    X = X - X.mean(1, keepdims=True)
    rng = np.random.default_rng(seed)
    X = X[rng.permutation(len(X))][:n_signals]
    if len(X) < n_signals:
        raise SystemExit(f"only {len(X)} patches at stride {stride}; lower --stride")
    return np.ascontiguousarray(X)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    Y = camera_signals(args.patch, args.stride, args.n_signals + args.heldout, args.seed)
    Y, Y_val = Y[: args.n_signals], Y[args.n_signals :]
    decay = args.lr_decay
    schedule = lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, decay)  # noqa: E731
    common = dict(
        random_state=args.seed if args.fit_seed is None else args.fit_seed,
        device=args.device,
        dtype=dtype,
        max_seconds=args.max_seconds,
        monitor_size=args.monitor,
        monitor_every=args.monitor_every,
        progress=False,
        validation_data=Y_val if args.heldout else None,
        validation_iter=args.heldout_iter,
        validation_refit=args.heldout_refit,
    )
    if args.device.startswith("cuda"):  # CUDA context, cuBLAS/cuSOLVER handles: untimed
        for method in args.methods:
            pu.SparseBayesianDictionaryLearning(64, method, max_iter=1, **common).fit(Y[:256])
        _sync(args.device)
    rows, curves = [], {}
    for D in args.atoms:
        fits = {}
        for method in args.methods:
            kw = dict(common, batch_size=args.batch_size)
            kw["max_seconds"] = args.budget.get(method, args.max_seconds)
            if method == "em":
                kw.update(max_iter=args.em_iter, batch_size=args.em_chunk)
            else:
                kw.update(max_iter=args.epochs, lr=args.lr, lr_schedule=schedule)
                kw.update(cuda_graph=method in args.cuda_graph, average=args.average)
                kw.update(clip_spikes=args.clip_spikes)
            kw["noise_floor"] = args.noise_floor
            if method != "em":
                kw["noise_update"] = args.noise_update
            kw["alpha_update"] = args.alpha_update.get(method, "em")
            kw["alpha_step"] = args.alpha_step.get(method, 1.0)
            if args.alpha_step_decay is not None:
                kw["alpha_step_decay"] = (int(args.alpha_step_decay[0]), args.alpha_step_decay[1])
            if method == "unrolled":
                kw.update(
                    num_samples=args.num_samples,
                    unroll_steps=args.unroll_steps,
                    warm_start=not args.cold_start,
                    variance_steps=args.variance_steps,
                    mean_steps=args.mean_steps,
                    mean_tol=args.mean_tol,
                    mean_round=args.mean_round,
                    mean_norm=args.mean_norm,
                    sample_tol=args.sample_tol,
                    estimator=args.estimator,
                    grad=args.grad,
                    preconditioner=False if args.preconditioner == "none" else args.preconditioner,
                )
            if args.save_states:
                kw["callback"] = state_saver(args.out / "states", method, D)
            t0 = time.perf_counter()
            est = pu.SparseBayesianDictionaryLearning(D, method, **kw).fit(Y)
            wall = time.perf_counter() - t0
            fits[method] = est
            save_partial(args.out, curves, D, fits, "sbl_dictionary.partial.json")
            last = est.history_[-1]
            print(
                f"D={D:5d} {method:12s} iters={est.n_iter_:4d} fit={last['seconds']:.1f}s "
                f"wall={wall:.1f}s loglik={last[KEY]:.3f} best="
                f"{max(h[KEY] for h in est.history_ if KEY in h):.3f}",
                flush=True,
            )
        curves[D] = {m: f.history_ for m, f in fits.items()}
        rows += rows_for(D, curves[D], KEY)
    return rows, curves


def state_saver(folder: Path, method: str, D: int) -> Callable[[dict, dict], None]:
    """The fit's ``callback``: each monitored state to ``folder/METHOD-DD-eEPOCH.pt``
    (``row``: the history row as monitored; ``components`` (D, N), ``noise_precision``)."""
    folder.mkdir(parents=True, exist_ok=True)

    def save(row: dict, state: dict) -> None:
        name = f"{method}-D{D}-e{row['iteration']:05d}.pt"
        torch.save({"method": method, "D": D, "row": dict(row), **state}, folder / name)

    return save


def parse_per_method(
    items: list[str], methods: list[str], flag: str, convert: Callable[[str], Any], want: str
) -> dict[str, Any]:
    """``["VALUE"]`` (every method) or ``["METHOD=VALUE", ...]`` → ``{method: convert(VALUE)}``;
    ``convert`` raises ``ValueError`` on a bad value, ``want`` says what a good one is."""
    values: dict[str, Any] = {}
    for item in items:
        method, _, text = item.rpartition("=")
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or (method and method not in methods):
            raise SystemExit(f"{flag} {item!r}: want VALUE or METHOD=VALUE, VALUE {want}")
        values.update({method: value} if method else dict.fromkeys(methods, value))
    return values


def _alpha_rule(text: str) -> str:
    if text not in ("em", "mackay"):
        raise ValueError(text)
    return text


def _alpha_step(text: str) -> float:
    rho = float(text)
    if not 0.0 < rho <= 1.0:
        raise ValueError(text)
    return rho


def level_ratios(curves: dict) -> list[dict]:
    """Per D, the time gradient EM and unrolled take to reach gradient EM's last monitored
    value (and 90% of the way there from the common start): the E-step comparison when
    neither stochastic method gets near EM's optimum within the budget."""
    out = []
    for D, by_method in curves.items():
        g, u = by_method.get("gradient_em"), by_method.get("unrolled")
        if not g or not u:
            continue
        monitored = [h[KEY] for h in g if KEY in h]
        start, final = monitored[0], monitored[-1]
        levels = (("gradient EM's last", final), ("90% of it", start + 0.9 * (final - start)))
        for name, level in levels:
            tg, tu = time_to(g, level, KEY), time_to(u, level, KEY)
            out.append(
                {
                    "D": D,
                    "level": f"{name} ({level:.4g})",
                    "gradient_em_s": tg,
                    "unrolled_s": tu,
                    "ratio": None if tg is None or tu is None else tg / tu,
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, nargs="+", default=[1024])
    p.add_argument("--methods", nargs="+", default=["em", "gradient_em", "unrolled"])
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--n-signals", type=int, default=2048)
    p.add_argument("--monitor", type=int, default=256, help="signals in the monitored subset")
    p.add_argument(
        "--monitor-every", type=int, default=1, help="epochs (EM iterations) between monitors"
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=0,
        help="monitor this many held-out patches instead of training ones (their α tracked by "
        "--heldout-iter α steps per epoch)",
    )
    p.add_argument("--heldout-iter", type=int, default=1, help="held-out α steps per epoch")
    p.add_argument(
        "--heldout-refit",
        type=int,
        default=None,
        help="refit the held-out α from scratch at each monitor with this many α steps",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--em-iter", type=int, default=200)
    p.add_argument("--em-chunk", type=int, default=128, help="EM's E-step chunk size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-decay", type=float, default=0.97, help="per-epoch ExponentialLR factor")
    p.add_argument("--num-samples", type=int, default=1, help="K")
    p.add_argument("--unroll-steps", type=int, default=10, help="I")
    p.add_argument(
        "--variance-steps",
        type=int,
        default=0,
        help="unrolled: extra CG steps (no graph) on the sample solves before the α step",
    )
    p.add_argument(
        "--mean-steps",
        type=int,
        default=None,
        help="unrolled: CG steps for the warm-started mean solves, apart from the samples' I "
        "(with --mean-tol: their cap)",
    )
    p.add_argument(
        "--noise-floor",
        type=float,
        default=None,
        help="floor on the noise variance as a fraction of the signals' power (every method; "
        "default √eps)",
    )
    p.add_argument(
        "--noise-update",
        choices=["gradient", "em", "mackay"],
        default="gradient",
        help="how gradient EM and unrolled step β: Adam on log β (default) or a closed-form step "
        "after each minibatch, EM's or MacKay's (the estimator's noise_update)",
    )
    p.add_argument(
        "--mean-tol",
        type=float,
        default=None,
        help="unrolled: solve the mean until ‖r‖ ≤ TOL·√(min diag A) (about TOL posterior "
        "standard deviations), at most --mean-steps steps",
    )
    p.add_argument(
        "--mean-round",
        type=int,
        default=None,
        help="unrolled, with --mean-tol: solve the mean in rounds of this many CG steps on "
        "the signals not yet converged",
    )
    p.add_argument(
        "--sample-tol",
        type=float,
        default=None,
        help="unrolled: stop each sample solve at √(rᵀM⁻¹r) ≤ TOL·√(εᵀM⁻¹ε), at most "
        "--unroll-steps steps",
    )
    p.add_argument(
        "--mean-norm",
        default="diagonal",
        choices=["diagonal", "preconditioned"],
        help="unrolled, with --mean-tol: TOL on ‖r‖/√(min diag A) or on √(rᵀM⁻¹r)",
    )
    p.add_argument(
        "--estimator",
        default="network",
        choices=["network", "output", "network_samples"],
        help="unrolled: network gradient (through the CG steps), output gradient, or the "
        "network gradient for the samples only",
    )
    p.add_argument(
        "--grad",
        default="unroll",
        choices=["unroll", "implicit"],
        help="unrolled, network gradient: backpropagate through the I CG steps or take one "
        "adjoint solve of I steps",
    )
    p.add_argument(
        "--preconditioner",
        default="shared",
        choices=["shared", "jacobi", "none"],
        help="unrolled: CG preconditioner (shared: diag(ᾱ) + βΦᵀΦ, one Cholesky per batch)",
    )
    p.add_argument(
        "--cold-start",
        action="store_true",
        help="unrolled: start every mean solve at 0 instead of the signal's last mean",
    )
    p.add_argument(
        "--alpha-update",
        nargs="+",
        default=[],
        metavar="[METHOD=]RULE",
        help="α step, em (default) or mackay: for every method, or per method (em=mackay)",
    )
    p.add_argument(
        "--alpha-step",
        nargs="+",
        default=[],
        metavar="[METHOD=]RHO",
        help="SAEM step size of the α step on 1/α (default 1, the full step): for every method "
        "or per method (unrolled=0.25)",
    )
    p.add_argument(
        "--average",
        type=float,
        help="stochastic methods: monitor the moving average of Φ, β with this decay per step",
    )
    p.add_argument(
        "--clip-spikes",
        type=float,
        help="stochastic methods: clip a minibatch gradient above this many times the running "
        "RMS of the past gradient norms",
    )
    p.add_argument(
        "--alpha-step-decay",
        nargs=2,
        type=float,
        metavar=("N0", "A"),
        help="every method: SAEM's decreasing α steps ρ·min(1, N0/n)^A at a signal's n-th step",
    )
    p.add_argument("--max-seconds", type=float, default=60.0, help="fitting budget per method")
    p.add_argument(
        "--budget",
        nargs="+",
        default=[],
        metavar="METHOD=SECONDS",
        help="per-method budgets that override --max-seconds, e.g. gradient_em=2200",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--cuda-graph",
        nargs="*",
        metavar="METHOD",
        help="replay these stochastic methods' minibatch step as a CUDA graph (bare: both)",
    )
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fit-seed",
        type=int,
        default=None,
        help="the fits' random_state (initial dictionary, minibatch order, Monte Carlo draws) "
        "apart from the data's --seed (default: --seed)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument(
        "--save-states",
        action="store_true",
        help="keep each monitored Φ, β in OUT/states/ for benchmarks/sbl_rescore.py",
    )
    p.add_argument("--note", default="", help="appended to the table's header line")
    p.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="rewrite the table and plot from earlier runs' sbl_dictionary.json (no fitting); "
        "several files (methods run in separate processes) have their histories pooled per D",
    )
    p.add_argument(
        "--header",
        help="with --from-json: the table's header line (default: the last file's), for a merge "
        "of runs whose settings no single file's header names",
    )
    args = p.parse_args()
    # each monitored value as it comes (runs under nohup have no progress bar)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("probunroll").setLevel(logging.INFO)  # not other libraries' INFO
    args.budget = parse_budgets(args.budget, args.methods)
    args.alpha_update = parse_per_method(
        args.alpha_update, args.methods, "--alpha-update", _alpha_rule, "em|mackay"
    )
    args.alpha_step = parse_per_method(
        args.alpha_step, args.methods, "--alpha-step", _alpha_step, "in (0, 1]"
    )
    if args.alpha_step_decay is not None and not args.alpha_step_decay[0].is_integer():
        p.error(f"--alpha-step-decay: N0 must be an integer, got {args.alpha_step_decay[0]:g}")
    args.cuda_graph = graph_methods(args.cuda_graph, args.device)
    if args.from_json is not None:
        curves: dict = {}
        for path in args.from_json:
            saved = json.loads(path.read_text())
            for D, by_method in saved["curves"].items():
                pooled = curves.setdefault(int(D), {})
                pooled.update({m: h for m, h in by_method.items() if m != "target"})
        curves = dict(sorted(curves.items()))
        rows = [r for D in curves for r in rows_for(D, curves[D], KEY)]
        for key in ("patch", "n_signals", "device", "dtype", "threads", "batch_size", "lr"):
            setattr(args, key, type(getattr(args, key))(saved["args"][key]))
        for key in ("lr_decay", "max_seconds"):
            setattr(args, key, float(saved["args"][key]))
        for key in ("num_samples", "unroll_steps", "variance_steps"):
            setattr(args, key, int(saved["args"].get(key, 0)))
        mean_steps = saved["args"].get("mean_steps", "None")  # saved args are strings
        args.mean_steps = None if mean_steps == "None" else int(mean_steps)
        mean_tol = saved["args"].get("mean_tol", "None")
        args.mean_tol = None if mean_tol == "None" else float(mean_tol)
        mean_round = saved["args"].get("mean_round", "None")
        args.mean_round = None if mean_round == "None" else int(mean_round)
        args.mean_norm = saved["args"].get("mean_norm", "diagonal")  # before it existed
        sample_tol = saved["args"].get("sample_tol", "None")
        args.sample_tol = None if sample_tol == "None" else float(sample_tol)
        args.noise_update = saved["args"].get("noise_update", "gradient")  # before it existed
        noise_floor = saved["args"].get("noise_floor", "None")
        args.noise_floor = None if noise_floor == "None" else float(noise_floor)
        args.estimator = saved["args"].get("estimator", "network")
        args.grad = saved["args"].get("grad", "unroll")
        args.preconditioner = saved["args"].get("preconditioner", "jacobi")  # before it existed
        args.note = saved["args"]["note"]
    else:
        rows, curves = run(args)
    rat = ratios(rows)
    N = args.patch**2
    fixed_mean = args.mean_steps and not args.mean_tol
    header = (
        f"SBL dictionary learning, camera {args.patch}×{args.patch} patches (N={N}), "
        f"T={args.n_signals}, {args.device} {args.dtype}, {args.threads} thread(s), "
        f"torch {torch.__version__}, batch {args.batch_size}, Adam lr {args.lr} "
        f"×{args.lr_decay}/epoch, K={args.num_samples}, I={args.unroll_steps}, "
        + (f"samples to {args.sample_tol:g} (preconditioned norm), " if args.sample_tol else "")
        + (f"{args.mean_steps} CG steps for the mean, " if fixed_mean else "")
        + (
            f"the mean solved to {args.mean_tol:g} posterior s.d. (at most {args.mean_steps} "
            + (f"steps, in rounds of {args.mean_round}" if args.mean_round else "steps")
            + (", in the preconditioned norm), " if args.mean_norm == "preconditioned" else "), ")
            if args.mean_tol
            else ""
        )
        + f"{args.estimator} gradient"
        + (" (implicit: one adjoint solve), " if args.grad == "implicit" else ", ")
        + (f"+{args.variance_steps} CG steps for the α step's Σ̂, " if args.variance_steps else "")
        + f"{args.preconditioner} preconditioner, "
        + f"{'cold' if args.cold_start else 'warm'}-started mean solves, "
        f"{args.max_seconds:g} s per method"
        + (
            f", monitor on {args.heldout} held-out signals ("
            + (
                f"their α refitted by {args.heldout_refit} α steps at each monitor)"
                if args.heldout_refit
                else f"{args.heldout_iter} α step(s) per epoch)"
            )
            if args.heldout
            else ""
        )
        + "".join(f", {m} ≤{t:g} s" for m, t in args.budget.items())
        + "".join(f", {m} replayed as a CUDA graph" for m in args.cuda_graph)
        + (f", Φ and β averaged over steps (decay {args.average:g})" if args.average else "")
        + (
            f", gradient spikes above {args.clip_spikes:g}× the running RMS norm clipped"
            if args.clip_spikes
            else ""
        )
        + (f", noise variance ≥ {args.noise_floor:g}× the power" if args.noise_floor else "")
        + (
            f", β by the closed-form {args.noise_update} step (stochastic methods)"
            if args.noise_update != "gradient"
            else ""
        )
        + "".join(f", {m} with MacKay α steps" for m, r in args.alpha_update.items() if r != "em")
        + "".join(f", {m} α step size {r:g}" for m, r in args.alpha_step.items() if r != 1.0)
        + (
            f", α steps decaying as ρ·min(1, {args.alpha_step_decay[0]:g}/n)^"
            f"{args.alpha_step_decay[1]:g} at a signal's n-th step"
            if args.alpha_step_decay
            else ""
        )
        + (f", fit seed {args.fit_seed}" if args.fit_seed is not None else "")
        + f" {args.note}"
    )
    if args.from_json is not None and "header" in saved:
        header = saved["header"]  # the machine and versions of the run, not of this replot
    if args.header is not None:
        if args.from_json is None:
            raise SystemExit("--header needs --from-json (a fresh run writes its own header)")
        header = args.header
    text = markdown(rows, header)
    if rat:
        target = target_name(curves[max(curves)], KEY)
        text += "\n\n" + markdown(rat, "Gradient EM / unrolled") + "\n\n" + summary(rat, target)
    levels = level_ratios(curves)
    if levels:
        text += "\n\n" + markdown(levels, "Time to gradient EM's own level (s)")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sbl_dictionary.md").write_text(text + "\n")
    payload = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "header": header,
        "rows": rows,
        "curves": curves,
    }
    (args.out / "sbl_dictionary.json").write_text(json.dumps(payload, indent=1, default=str))
    plot(
        curves,
        args.out / "sbl_dictionary.png",
        KEY,
        "held-out log-likelihood / signal"
        if args.heldout or "held-out" in header
        else "log-likelihood / signal (monitored)",
        panel="atoms",
    )


if __name__ == "__main__":
    main()
