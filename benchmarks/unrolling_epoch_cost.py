"""Benchmark: cost of one epoch, gradient EM vs probabilistic unrolling, as the latent
dimension D and the unrolled budget (K samples, I CG steps) vary.

Same data as ``benchmarks/unrolling.py`` (factor analysis with missing entries on 32×32
patches of ``skimage.data.camera()``, 1024 observed dims), same optimizer and minibatches; each
method runs two epochs and the second is timed (the first pays for allocation and the
initialisation). No convergence is measured here: this isolates the E-step cost that
``benchmarks/unrolling.py`` turns into time-to-target.

Cost model per data point with ``P`` observed entries (flops, up to constants):

- gradient EM (exact posterior, the cheaper of the D×D and Woodbury P×P forms, plus the
  Fisher-identity gradient through ``W Σ_n``): about ``P·D² + min(D, P)³``;
- unrolled: ``(K + 1)`` right-hand sides × ``I`` CG steps × two masked products with ``W``
  (``2·P·D`` each), forward and backward: about ``(K + 1)·I·P·D``.

Their ratio grows like ``D / ((K + 1)·I)``: with K=5, I=20 (120 solves per point) unrolled only
pulls ahead by a few × at D ≤ 1024, while K=1, I=10 (20) buys about 6× more.

Usage: ``python benchmarks/unrolling_epoch_cost.py --latent 128 256 512 --threads 1``.
Writes ``unrolling-epoch-cost.json`` and ``.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from pathlib import Path

import torch

import probunroll as pu
from probunroll import NumericalWarning

try:  # run as a script from the repository root or from benchmarks/
    from unrolling import camera_patches, graph_methods, markdown
except ImportError:  # pragma: no cover
    from benchmarks.unrolling import camera_patches, graph_methods, markdown


def epoch_seconds(method: str, D: int, train, args, **extra) -> float:
    """Seconds of the second of two epochs (``history_`` is cumulative fitting time)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        fa = pu.FactorAnalysis(
            D,
            method=method,
            max_iter=2,
            tol=0.0,
            batch_size=args.batch_size,
            lr=1e-3,
            random_state=args.seed,
            dtype=torch.float32,
            device=args.device,
            progress=False,
            **extra,
        ).fit(train)
    hist = fa.history_
    return hist[-1]["seconds"] - hist[0]["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--budgets", nargs="+", default=["5x20", "1x10"], help="unrolled K x I settings")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--missing", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--preconditioner",
        default="shared",
        choices=["shared", "jacobi"],
        help="unrolled CG preconditioner (results before 2026-11-26 used jacobi)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--cuda-graph",
        nargs="*",
        metavar="METHOD",
        help="on CUDA, also time these methods (bare: both) with the minibatch step replayed "
        "as a CUDA graph",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    args.cuda_graph = graph_methods(args.cuda_graph, args.device)
    torch.set_num_threads(args.threads)
    train, _ = camera_patches(32, 4, args.missing, args.n_train, 0, args.seed)
    budgets = [tuple(int(v) for v in b.split("x")) for b in args.budgets]
    rows = []
    modes = {"": False, "_graph": True} if args.cuda_graph else {"": False}
    for D in args.latent:
        row: dict = {"D": D}
        for tag, graph in modes.items():
            g = row[f"gradient_em{tag}_s"] = epoch_seconds(
                "gradient_em", D, train, args, cuda_graph=graph and "gradient_em" in args.cuda_graph
            )
            for K, I in budgets:
                t = epoch_seconds(
                    "unrolled",
                    D,
                    train,
                    args,
                    num_samples=K,
                    unroll_steps=I,
                    preconditioner=args.preconditioner,
                    cuda_graph=graph and "unrolled" in args.cuda_graph,
                )
                row[f"unrolled_{K}x{I}{tag}_s"] = t
                row[f"ratio_{K}x{I}{tag}"] = g / t
        rows.append(row)
        print(json.dumps(row), flush=True)
    where = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)"
    )
    machine = f"{where}, torch {torch.__version__}"
    header = (
        f"FA with {args.missing:.0%} missing, 32x32 camera patches, n_train={args.n_train}, "
        f"batch {args.batch_size}, float32, {machine}: seconds per epoch and gradient EM / "
        f"unrolled per-epoch ratio (K samples x I CG steps, {args.preconditioner} preconditioner"
        + (
            f"; _graph: {' and '.join(args.cuda_graph)} replayed as a CUDA graph)"
            if args.cuda_graph
            else ")"
        )
    )
    text = markdown(rows, header)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unrolling-epoch-cost.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=1)
    )
    (args.out / "unrolling-epoch-cost.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
