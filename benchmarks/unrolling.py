"""Benchmark: probabilistic unrolling vs gradient EM vs exact EM for factor analysis with
missing data on 32×32 patches of scikit-image's ``data.camera()``.

For every latent dimension D the three methods fit the same training patches from the same
initialisation (probabilistic PCA of the available-case covariance); gradient EM and unrolled
share the optimizer (Adam), the learning-rate schedule and the minibatches (the order comes
from its own seeded stream). Every epoch/iteration the exact held-out log-likelihood per patch
is recorded (untimed). The target is the EM optimum: the best held-out value of exact EM (else
the best of any method, flagged). The table reports the time each method needed to come within
1% (and 0.1%) of it, the ratio gradient-EM time / unrolled time, the crossover D (the smallest
D from which on unrolled reaches the target first) and the ratio at the largest D, and writes
a plot of held-out log-likelihood against seconds, one line per method and one panel per D.

The schedule (Adam, lr 1e-3, ×0.97 per epoch, batch 256) was tuned once for both stochastic
methods on an H100 at D=256, n_train=8192, over lr ∈ {1e-3, 3e-3} × decay ∈ {0.9, 0.97}:
lr 3e-3 drops the held-out likelihood in the first epochs (and makes unrolled noisy);
decay 0.9 freezes gradient EM just short of the target; lr 1e-3 with 0.97 reached it.

The unrolled budget defaults to K=1 sample and I=5 CG steps with the batch-shared
preconditioner (the library default, ``FactorAnalysisModel.preconditioner``). Per epoch
unrolled costs about (K+1)·I·P·D against gradient EM's P·D² (``unrolling_epoch_cost.py``),
so K=5, I=20 (the paper's and the tests' setting, 120 solves per point) leaves only 2-8× per
epoch at D=256-1024 on a CPU, while K=1, I=10 gives 11-43×; the noise of one sample per point
averages out over the minibatch and the epochs. With Jacobi, I=10 was needed (and D=1024 was
unstable on the GPU); the shared preconditioner's solve error after five steps is below
Jacobi's after ten, and it reached the target in as many epochs at D=256-1024 at I=5
(``--preconditioner jacobi --unroll-steps 10`` gives the earlier setting).

On CUDA each method is warmed up once (D=64, 1 epoch) before timing, and every timed epoch
ends with a device synchronisation.

Gradient EM and EM use the cheaper of the direct (D×D) and Woodbury (N×N) posterior forms
(``posterior_form="auto"``), so the comparison is against the best exact E-step.

Usage::

    python benchmarks/unrolling.py --latent 64 128 --n-train 1024 --n-val 256 --max-seconds 60
    python benchmarks/unrolling.py --device cuda --latent 128 256 512 1024 --max-seconds 30
    python benchmarks/unrolling.py --merge a/unrolling.json b/unrolling.json --out merged

Writes ``unrolling.json``, ``unrolling.md`` and ``unrolling.png`` into ``--out``.

Reference: Lin, Tolooshams, Atchadé & Ba, ICML 2023, arXiv:2306.03249 (their target: unrolled
≥ 10× faster than gradient EM at large latent dimension).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

import probunroll as pu


def camera_patches(patch: int, stride: int, missing: float, n_train: int, n_val: int, seed: int):
    """Patches of ``data.camera()`` scaled to [0, 1], shuffled, with entries missing at random."""
    from skimage import data

    img = data.camera().astype(np.float64) / 255.0
    win = np.lib.stride_tricks.sliding_window_view(img, (patch, patch))[::stride, ::stride]
    X = win.reshape(-1, patch * patch).copy()
    rng = np.random.default_rng(seed)
    X = X[rng.permutation(len(X))][: n_train + n_val]
    if len(X) < n_train + n_val:
        raise SystemExit(f"only {len(X)} patches at stride {stride}; lower --stride")
    X[rng.random(X.shape) < missing] = np.nan
    X[np.isnan(X).all(1), 0] = 0.5
    return X[:n_train], X[n_train:]


KEY = "heldout_loglik"  # the history column the target is read from


def time_to(history: list[dict], target: float, key: str = KEY) -> float | None:
    for entry in history:  # rows without ``key``: epochs the monitor skipped
        if key in entry and entry[key] >= target:
            return entry["seconds"]
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(args: argparse.Namespace, train, dtype) -> None:
    """One untimed epoch of every method at D=64: CUDA context, cuBLAS/cuSOLVER handles."""
    for method in args.methods:
        graph = method in args.cuda_graph
        pu.FactorAnalysis(
            64,
            method=method,
            max_iter=1,
            device=args.device,
            dtype=dtype,
            progress=False,
            cuda_graph=graph,
        ).fit(train[:512])
    _sync(args.device)


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    train, val = camera_patches(
        args.patch, args.stride, args.missing, args.n_train, args.n_val, args.seed
    )
    warm_up(args, train, dtype)
    common = dict(
        init=args.init,
        random_state=args.seed,
        validation_data=val,
        device=args.device,
        dtype=dtype,
        batch_size=args.batch_size,
        max_seconds=args.max_seconds,
        monitor_every=args.monitor_every,
        progress=False,
    )
    decay = args.lr_decay
    schedule = lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, decay)  # noqa: E731
    stochastic = dict(max_iter=args.epochs, lr=args.lr, lr_schedule=schedule, tol=0.0)
    rows, curves = [], {}
    N = train.shape[1]
    for D in args.latent:
        fits = {}
        for method in args.methods:
            em_bytes = N * (D + 1) ** 2 * (4 if dtype == torch.float32 else 8)
            if method == "em" and em_bytes > args.em_memory_gb * 2**30:
                print(f"D={D}: EM statistics need {em_bytes / 2**30:.1f} GiB, skipped")
                continue
            kw = dict(common)
            kw["max_seconds"] = args.budget.get(method, args.max_seconds)
            if method == "em":
                kw.update(max_iter=args.em_iter, tol=args.em_tol)
            else:
                kw.update(stochastic, cuda_graph=method in args.cuda_graph)
            if method == "unrolled":
                kw.update(
                    num_samples=args.num_samples,
                    unroll_steps=args.unroll_steps,
                    preconditioner=args.preconditioner,
                )
            _sync(args.device)
            t0 = time.perf_counter()
            try:
                fa = pu.FactorAnalysis(D, method=method, **kw).fit(train)
            except torch.linalg.LinAlgError as err:  # fp32 Cholesky near the ψ → ∞ boundary
                print(f"D={D:5d} {method:12s} FAILED: {str(err)[:100]}", flush=True)
                continue
            wall = time.perf_counter() - t0
            fits[method] = fa
            save_partial(args.out, curves, D, fits)
            last = fa.history_[-1]
            print(
                f"D={D:5d} {method:12s} iters={fa.n_iter_:4d} fit={last['seconds']:.1f}s "
                f"wall={wall:.1f}s heldout={last['heldout_loglik']:.3f}",
                flush=True,
            )
        if not fits:
            continue
        curves[D] = {m: f.history_ for m, f in fits.items()}
        rows += rows_for(D, curves[D])
    return rows, curves


def save_partial(
    out: Path, curves: dict, D: int, fits: dict, name: str = "unrolling.partial.json"
) -> None:
    """Histories finished so far into ``out/name`` (a long run stopped early keeps them;
    ``--merge`` / ``--from-json`` read the file)."""
    done = {**curves, D: {m: f.history_ for m, f in fits.items()}}
    payload = {
        "args": {},
        "curves": {str(k): {m: h for m, h in v.items() if m != "target"} for k, v in done.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(payload, indent=1, default=str))


def best_values(histories: dict, key: str = KEY) -> dict[str, float]:
    """Each method's best monitored ``key`` value (the ``"target"`` entry skipped)."""
    return {m: max(e[key] for e in h if key in e) for m, h in histories.items() if m != "target"}


def target_source(best: dict[str, float]) -> str:
    """The method whose best value is the target: EM where it ran, else the best method."""
    return "em" if "em" in best else max(best, key=best.get)


def target_name(histories: dict, key: str = KEY) -> str:
    """How the summary names the 1% target: "the EM optimum", or "<method>'s best" where EM
    did not run."""
    source = target_source(best_values(histories, key))
    return "the EM optimum" if source == "em" else f"{source}'s best"


def rows_for(D: int, histories: dict, key: str = KEY) -> list[dict]:
    """Table rows of one D from each method's ``history_``; stores the target in
    ``histories["target"]`` (EM's best ``key`` value, else the best of any method)."""
    hists = {m: h for m, h in histories.items() if m != "target"}
    best = best_values(hists, key)
    source = target_source(best)
    target = best[source]
    histories["target"] = target
    rows = []
    for method, hist in hists.items():
        rows.append(
            {
                "D": D,
                "method": method,
                "epochs": len(hist),
                "s/epoch": hist[-1]["seconds"] / len(hist),
                "best heldout" if key == KEY else "best": best[method],
                "target": target if source == "em" else f"{target:.4g} ({source})",
                "t(1%)": time_to(hist, target - 0.01 * abs(target), key),
                "t(0.1%)": time_to(hist, target - 0.001 * abs(target), key),
            }
        )
    return rows


def merge(paths: list[Path]) -> tuple[list[dict], dict]:
    """Rows and curves from several ``unrolling.json`` files (methods run in separate
    processes, e.g. one per pinned core), the histories of each D pooled."""
    curves: dict = {}
    for path in paths:
        for D, by_method in json.loads(Path(path).read_text())["curves"].items():
            curves.setdefault(int(D), {}).update(
                {m: h for m, h in by_method.items() if m != "target"}
            )
    rows = []
    for D in sorted(curves):
        rows += rows_for(D, curves[D])
    return rows, dict(sorted(curves.items()))


def ratios(rows: list[dict]) -> list[dict]:
    """Per D: gradient-EM time over unrolled time (per epoch and to the 1% target)."""
    out = []
    for D in sorted({r["D"] for r in rows}):
        by = {r["method"]: r for r in rows if r["D"] == D}
        if "gradient_em" in by and "unrolled" in by:
            g, u = by["gradient_em"], by["unrolled"]
            to_target = g["t(1%)"] / u["t(1%)"] if g["t(1%)"] and u["t(1%)"] else None
            # Only one reached the target: a bound from the other's whole fitting time.
            bound = None
            if to_target is None and u["t(1%)"] and not g["t(1%)"]:
                to_target = float("inf")
                bound = f"≥ {g['s/epoch'] * g['epochs'] / u['t(1%)']:.3g}"
            if to_target is None and g["t(1%)"] and not u["t(1%)"]:
                to_target = 0.0
                bound = f"≤ {g['t(1%)'] / (u['s/epoch'] * u['epochs']):.3g}"
            out.append(
                {
                    "D": D,
                    "per-epoch ratio": g["s/epoch"] / u["s/epoch"],
                    "to-1% ratio": to_target,
                    "bound": bound,
                }
            )
    return out


def summary(rat: list[dict], target: str = "the EM optimum") -> str:
    """Crossover D (from which on unrolled reaches the 1% target first) and the ratio at the
    largest D; the per-epoch crossover where no time-to-target ratio exists. ``target``
    names the target (:func:`target_name`)."""
    lines = []
    for key, what in (
        ("to-1% ratio", f"time to 1% of {target}"),
        ("per-epoch ratio", "time per epoch"),
    ):
        known = [r for r in rat if r[key] is not None]
        if not known:
            lines.append(f"- {what}: no D where both reached the target")
            continue
        cross = None
        for i, r in enumerate(known):
            if all(q[key] > 1.0 for q in known[i:]):
                cross = r["D"]
                break
        last = known[-1]
        where = f"D = {cross}" if cross is not None else "not within the sizes run"
        value = last[key]
        if value == float("inf"):
            at_last = (
                "only unrolled reached the target within the budget: gradient EM / unrolled "
                f"{last['bound']}× (gradient EM's whole budget over unrolled's time)"
            )
        elif value == 0.0:
            at_last = "only gradient EM reached the target within the budget"
        else:
            at_last = f"gradient EM / unrolled = {value:.3g}×"
        lines.append(
            f"- {what}: unrolled overtakes gradient EM from {where}; at D = {last['D']}: " + at_last
        )
    return "\n".join(lines)


def markdown(rows: list[dict], header: str) -> str:
    def fmt(v):
        if v is None:
            return "—"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cols = list(rows[0])
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


COLORS = {"em": "C0", "gradient_em": "C1", "unrolled": "C2"}  # the same in every panel


def plot(
    curves: dict,
    path: Path,
    key: str = KEY,
    ylabel: str = "held-out log-likelihood / patch",
    panel: str = "D",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, (D, by_method) in zip(axes[0], curves.items(), strict=True):
        target = by_method["target"]
        for method, hist in by_method.items():
            if method == "target":
                continue
            t = [h["seconds"] for h in hist if key in h]
            ll = [h[key] for h in hist if key in h]
            extra = [m for m in by_method if m not in COLORS and m != "target"]
            color = COLORS.get(method) or f"C{3 + extra.index(method)}"  # variants: own colors
            ax.plot(t, ll, marker=".", label=method, color=color)
        best = best_values(by_method, key)
        source = target_source(best)
        label = "EM − 1%" if source == "em" else f"{source}'s best − 1%"
        ax.axhline(target - 0.01 * abs(target), color="gray", ls="--", lw=0.8, label=label)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded labels
        ax.set_title(f"{panel} = {D}")
        ax.set_xlabel("seconds (fitting only)")
        ax.set_ylabel(ylabel)
        bests = list(best.values())
        spread = max(bests) - min(bests)  # far-apart methods: show the laggard's climb too
        low = min(target - 0.05 * abs(target), min(bests) - 0.5 * spread - 0.02 * abs(target))
        ax.set_ylim(low, max([target, *bests]) + 0.01 * abs(target))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_budgets(items: list[str], methods: list[str]) -> dict[str, float]:
    """``["gradient_em=3300", ...]`` → ``{"gradient_em": 3300.0}``."""
    budgets = {}
    for item in items:
        method, sep, seconds = item.partition("=")
        if not sep or method not in methods:
            raise SystemExit(f"--budget {item!r}: expected METHOD=SECONDS with METHOD in {methods}")
        budgets[method] = float(seconds)
    return budgets


def graph_methods(chosen: list[str] | None, device: str) -> list[str]:
    """``--cuda-graph`` → the methods to replay as CUDA graphs (bare flag: both stochastic)."""
    stochastic = ["gradient_em", "unrolled"]
    if chosen is None:
        return []
    chosen = chosen or stochastic
    if not device.startswith("cuda"):
        raise SystemExit("--cuda-graph needs --device cuda")
    if bad := [m for m in chosen if m not in stochastic]:
        raise SystemExit(f"--cuda-graph: {bad} not in {stochastic}")
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--methods", nargs="+", default=["em", "gradient_em", "unrolled"])
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--missing", type=float, default=0.3)
    p.add_argument("--n-train", type=int, default=8192)
    p.add_argument("--n-val", type=int, default=1024)
    p.add_argument(
        "--monitor-every", type=int, default=1, help="epochs (EM iterations) between monitors"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--em-iter", type=int, default=500)
    p.add_argument("--em-tol", type=float, default=1e-6, help="EM relative tolerance")
    p.add_argument("--em-memory-gb", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay", type=float, default=0.97, help="per-epoch ExponentialLR factor")
    p.add_argument("--num-samples", type=int, default=1, help="K (see the module docstring)")
    p.add_argument("--unroll-steps", type=int, default=5, help="I (see the module docstring)")
    p.add_argument(
        "--preconditioner",
        default="shared",
        choices=["shared", "jacobi"],
        help="unrolled CG preconditioner: the batch's expected precision, or exact diag(A_n)",
    )
    p.add_argument("--max-seconds", type=float, default=30.0, help="fitting budget per method")
    p.add_argument(
        "--budget",
        nargs="+",
        default=[],
        metavar="METHOD=SECONDS",
        help="per-method budgets that override --max-seconds, e.g. gradient_em=3300",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument(
        "--cuda-graph",
        nargs="*",
        metavar="METHOD",
        help="replay these stochastic methods' minibatch step as a CUDA graph (bare: both)",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="pca", choices=["pca", "random"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="pool the histories of these unrolling.json files (no fitting; the other "
        "options only label the table)",
    )
    p.add_argument("--note", default="", help="appended to the table's header line")
    args = p.parse_args()
    # each monitored value as it comes (runs under nohup have no progress bar)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("probunroll").setLevel(logging.INFO)  # not other libraries' INFO
    args.budget = parse_budgets(args.budget, args.methods)
    args.cuda_graph = graph_methods(args.cuda_graph, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, curves = merge(args.merge) if args.merge else run(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    header = (
        f"FA with {args.missing:.0%} missing, {args.patch}x{args.patch} camera patches, "
        f"n_train={args.n_train}, n_val={args.n_val}, {args.dtype}, {device}, "
        f"{args.threads} threads, K={args.num_samples}, I={args.unroll_steps}, "
        f"{args.preconditioner} preconditioner, "
        f"Adam lr={args.lr:g} ×{args.lr_decay:g}/epoch, batch {args.batch_size}"
        + "".join(f", {m} replayed as a CUDA graph" for m in args.cuda_graph)
        + ("" if args.merge else f", ≤{args.max_seconds:g} s per method")
        + "".join(f", {m} ≤{s:g} s" for m, s in ({} if args.merge else args.budget).items())
        + (f"; {args.note}" if args.note else "")
    )
    text = markdown(rows, header)
    rat = ratios(rows)
    if rat:
        text += "\n\n" + markdown(rat, "gradient EM time / unrolled time")
        text += "\n\n" + summary(rat, target_name(curves[max(curves)]))
    print("\n" + text)
    (args.out / "unrolling.md").write_text(text + "\n")
    (args.out / "unrolling.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "rows": rows,
                "curves": {str(k): v for k, v in curves.items()},
            },
            indent=1,
        )
    )
    plot(curves, args.out / "unrolling.png")


if __name__ == "__main__":
    main()
