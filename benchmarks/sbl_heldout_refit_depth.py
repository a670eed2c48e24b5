"""Diagnostic: how many α steps does a held-out signal's evidence need under a fitted dictionary?

The held-out monitor of ``benchmarks/sbl_dictionary.py --heldout-refit R`` scores each
held-out signal by its evidence ``max_α log N(y; 0, Φ diag(α)⁻¹ Φᵀ + β⁻¹ I)`` with the maximum
approximated by ``R`` EM α steps from scratch (:func:`probunroll.models.sbl_dictionary.
fit_local_precisions`). EM's α steps slow down as the noise variance ``β⁻¹`` shrinks (Wipf &
Rao 2004: the EM update of a pruned or well-determined coefficient moves by a factor that tends
to one), so a monitor with a fixed ``R`` may understate a late dictionary, whose ``β`` is
larger, more than an early one. This script fits the same dictionary (same data, settings and
seed as the benchmark) to several epoch counts and scores each on the held-out signals with an
increasing number of α steps, so one sees whether a fall of the monitored value is the model's
or the monitor's.

Usage::

    python benchmarks/sbl_heldout_refit_depth.py --patch 16 --atoms 1024 --n-signals 2048 \\
        --epochs 30 60 --depths 50 200 800 --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from sbl_dictionary import camera_signals

import probunroll as pu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--atoms", type=int, default=1024)
    p.add_argument("--n-signals", type=int, default=2048)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--epochs", type=int, nargs="+", default=[30, 60])
    p.add_argument("--depths", type=int, nargs="+", default=[50, 200, 800])
    p.add_argument("--method", choices=["unrolled", "gradient_em"], default="unrolled")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--sample-tol", type=float, default=0.1)
    p.add_argument("--unroll-steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--lr-decay", type=float, default=0.999)
    p.add_argument(
        "--beta-lr-factor",
        type=float,
        default=1.0,
        help="Adam's rate on log β is this times --lr (the dictionary's stays --lr)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def fit(args: argparse.Namespace, Y, epochs: int) -> pu.SparseBayesianDictionaryLearning:
    """The benchmark's K=4 recipe (``README``: output gradient, shared preconditioner, mean to
    1e-3 s.d. in rounds of 25, samples to ``--sample-tol``, α step 0.25 decaying, spikes
    clipped, noise floor 1e-7), the final iterate kept (no best-iterate restore); with
    ``--beta-lr-factor F`` Adam steps log β at F times the dictionary's rate."""
    decay = args.lr_decay
    kw = dict(
        max_iter=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, decay),
        random_state=args.seed,
        dtype=torch.float64,
        progress=False,
        monitor_every=10**6,  # only after the last epoch
        noise_floor=1e-7,
        alpha_step=0.25,
        alpha_step_decay=(50, 1.0),
        clip_spikes=10.0,
        restore_best=False,
    )
    factor = getattr(args, "beta_lr_factor", 1.0)
    if factor != 1.0:  # Adam's rate on log β apart from the dictionary's
        kw["noise_lr"] = factor * args.lr
    if args.method == "unrolled":
        kw.update(
            num_samples=args.num_samples,
            unroll_steps=args.unroll_steps,
            mean_steps=250,
            mean_tol=1e-3,
            mean_round=25,
            sample_tol=args.sample_tol,
            estimator="output",
            preconditioner="shared",
        )
    return pu.SparseBayesianDictionaryLearning(args.atoms, args.method, **kw).fit(Y)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    signals = camera_signals(args.patch, args.stride, args.n_signals + args.heldout, args.seed)
    Y, Y_val = signals[: args.n_signals], signals[args.n_signals :]
    rows = []
    print(
        f"{args.method}, {args.patch}×{args.patch} patches, {args.atoms} atoms, T={args.n_signals}"
        f", {args.heldout} held-out; held-out log-likelihood per signal after R α steps",
        flush=True,
    )
    print("| epochs | fit s | log β | " + " | ".join(f"R={r}" for r in args.depths) + " |")
    print("|---" * (3 + len(args.depths)) + "|", flush=True)
    for epochs in args.epochs:
        est = fit(args, Y, epochs)
        row = {
            "epochs": epochs,
            "fit_seconds": est.history_[-1]["seconds"],
            "log_beta": math.log(float(est.noise_precision_)),
            "heldout": {},
            "score_seconds": {},
        }
        for depth in args.depths:
            t0 = time.perf_counter()
            row["heldout"][depth] = est.score(Y_val, n_iter=depth)
            row["score_seconds"][depth] = time.perf_counter() - t0
        rows.append(row)
        values = " | ".join(f"{row['heldout'][r]:.1f}" for r in args.depths)
        print(
            f"| {epochs} | {row['fit_seconds']:.0f} | {row['log_beta']:.2f} | {values} |",
            flush=True,
        )
        if args.out is not None:
            args.out.write_text(
                json.dumps(
                    {"args": vars(args) | {"out": str(args.out)}, "rows": rows},
                    indent=1,
                    default=str,
                )
            )


if __name__ == "__main__":
    main()
