"""How accurate are an unrolled SBL dictionary fit's truncated CG solves, along the fit?

Runs the output-gradient unrolled fit of ``sbl_dictionary.py`` (camera patches, K=1, I CG steps
on ``[b, ε̄]``, the mean warm-started from the previous epoch, the samples from 0) and, every
``--every`` minibatch steps, re-solves that step's systems from the same starts with
10, 20, 30, 40, 60 and 100 CG steps (no effect on the fit) and records the relative residuals
``‖b − A x‖ / ‖b‖`` of the mean systems and of the sample systems (median and max over the
minibatch). The question it answers: how many steps do the mean (warm) and the sample (cold)
solves need, and does that change as β grows?

Example (the numbers quoted in ``SparseBayesianDictionaryLearning``'s ``mean_steps``):
``python benchmarks/sbl_solve_residuals.py --unroll-steps 30 --epochs 600 --out DIR``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sbl_dictionary import camera_signals

import probunroll as pu
import probunroll.inference.unrolled as unrolled
from probunroll.linalg import cg

STEPS = (10, 20, 30, 40, 60, 100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--atoms", type=int, default=256)
    p.add_argument("--n-signals", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--unroll-steps", type=int, default=30, help="I of the fit itself")
    p.add_argument("--epochs", type=int, default=600)
    p.add_argument("--every", type=int, default=80, help="minibatch steps between records")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--lr-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    records: list[dict] = []
    count = [0]
    fit_cg = unrolled.cg

    def recording_cg(A, B, *, x0=None, M_inv=None, max_iters=None, **kw):
        res = fit_cg(A, B, x0=x0, M_inv=M_inv, max_iters=max_iters, **kw)
        if B.dim() == 3 and max_iters == args.unroll_steps:  # the fit's [b, ε̄] solve
            if count[0] % args.every == 0:
                row = {"step": count[0]}
                with torch.no_grad():
                    Bd, start = B.detach(), None if x0 is None else x0.detach()
                    scale = torch.linalg.vector_norm(Bd, dim=-1)
                    for k in STEPS:
                        x = cg(A, Bd, x0=start, M_inv=M_inv, tol=None, max_iters=k, grad="none")
                        rel = torch.linalg.vector_norm(Bd - A(x.x), dim=-1) / scale
                        row[k] = [float(rel[0].median()), float(rel[0].max())]
                        row[k] += [float(rel[1:].median()), float(rel[1:].max())]
                records.append(row)
            count[0] += 1
        return res

    unrolled.cg = recording_cg
    Y = camera_signals(args.patch, args.stride, args.n_signals, args.seed)
    schedule = lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, args.lr_decay)  # noqa: E731
    est = pu.SparseBayesianDictionaryLearning(
        args.atoms,
        "unrolled",
        max_iter=args.epochs,
        batch_size=args.batch_size,
        num_samples=1,
        unroll_steps=args.unroll_steps,
        estimator="output",
        alpha_step=0.25,
        alpha_step_decay=(50, 1),
        lr=args.lr,
        lr_schedule=schedule,
        clip_spikes=10,
        monitor_every=args.epochs,
        random_state=args.seed,
        progress=False,
    )
    t0 = time.perf_counter()
    est.fit(Y)
    wall = time.perf_counter() - t0
    unrolled.cg = fit_cg

    steps_per_epoch = -(-args.n_signals // args.batch_size)
    lines = [
        f"SBL dictionary fit, camera {args.patch}×{args.patch} patches, {args.atoms} atoms, "
        f"T={args.n_signals}, batch {args.batch_size}, K=1, output gradient, I="
        f"{args.unroll_steps} (mean warm-started, samples from 0), α step 0.25 decaying "
        f"(50, 1), Adam lr {args.lr} ×{args.lr_decay}, clip 10, seed {args.seed}, torch "
        f"{torch.__version__}; final β = {est.noise_precision_:.3g}; {wall:.0f} s. Relative "
        "residual ‖b − Ax‖/‖b‖ after k CG steps from the fit's own starts: "
        "median / max over the minibatch.",
        "",
        "| epoch | "
        + " | ".join(f"mean k={k}" for k in STEPS)
        + " | "
        + " | ".join(f"samples k={k}" for k in STEPS)
        + " |",
        "|---" * (1 + 2 * len(STEPS)) + "|",
    ]
    for row in records:
        mean = [f"{row[k][0]:.1e} / {row[k][1]:.1e}" for k in STEPS]
        samples = [f"{row[k][2]:.1e} / {row[k][3]:.1e}" for k in STEPS]
        lines.append(f"| {row['step'] // steps_per_epoch} | " + " | ".join(mean + samples) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"sbl_solve_residuals-p{args.patch}-{args.atoms}-i{args.unroll_steps}.md"
    (args.out / name).write_text(text)


if __name__ == "__main__":
    main()
