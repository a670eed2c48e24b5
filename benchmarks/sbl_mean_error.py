"""Why the unrolled SBL dictionary fits fall: the mean's error in posterior standard deviations.

Runs ``SparseBayesianDictionaryLearning(method="unrolled")`` on 16×16 camera patches (the
settings of the README's held-out runs: 256 atoms, T=512, K=1, output gradient, α step 0.25
decaying, ``clip_spikes=10``, Adam lr 0.03 ×0.999) and logs, at every minibatch step from
``--from-epoch`` on: β, the mean solve's residual ``r = b − Aμ̂`` as ``‖r‖/‖b‖`` (relative)
and as ``‖r‖/√(min_i A_ii)`` (about the error's Mahalanobis length under the posterior,
``‖μ̂ − μ‖_A``, in posterior standard deviations; ``UnrolledConfig.mean_tol``), the
dictionary and ``log β`` gradient norms before clipping, the clipper's running RMS and
whether it clipped. With ``--mean-steps 40`` (fixed) the log shows the error in posterior
s.d. growing with β until the gradient runs away; with ``--mean-tol`` it stays put.

No held-out monitor runs (it draws no random numbers, so the trajectory is that of the
monitored runs); the last epoch's exact training log-likelihood is printed.

    python benchmarks/sbl_mean_error.py --epochs 395 --from-epoch 340 --mean-steps 40 \\
        --out benchmarks/results/sbl_mean_error-p16-256-i10-mean40.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from sbl_dictionary import camera_signals

import probunroll as pu
import probunroll.inference.stochastic as stochastic
import probunroll.inference.unrolled as unrolled
from probunroll.models.sbl_dictionary import SBLDictionaryModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=395)
    p.add_argument("--from-epoch", type=int, default=340)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unroll-steps", type=int, default=10)
    p.add_argument("--mean-steps", type=int, default=40)
    p.add_argument("--mean-tol", type=float, default=None)
    p.add_argument(
        "--method",
        default="unrolled",
        choices=["unrolled", "gradient_em"],
        help="gradient_em: the same fit with the exact E-step (β, gradients; no mean solve)",
    )
    p.add_argument("--noise-floor", type=float, default=None)
    p.add_argument("--stride", type=int, default=1, help="epochs per table row")
    p.add_argument("--out", type=Path, default=None, help="markdown table (and a .json log)")
    args = p.parse_args()
    torch.set_num_threads(1)
    batches_per_epoch = 4  # T=512, batch 128
    first = args.from_epoch * batches_per_epoch
    step, row, log = [0], {}, []

    original_solve = unrolled.unrolled_solve

    def solve(model, params, batch, **kw):  # the fit's own solve, then its residuals
        res = original_solve(model, params, batch, **kw)
        if step[0] >= first:
            with torch.no_grad():
                A = model.precision_operator(params, batch)
                b = model.rhs(params, batch).detach()
                r = torch.linalg.vector_norm(b - A(res.mean.detach()), dim=-1)
                d_min = model.preconditioner_diag(params, batch).detach().amin(-1)
                rel = r / torch.linalg.vector_norm(b, dim=-1)
                sd = r / d_min.sqrt()
            row.update(
                rel_median=float(rel.median()),
                sd_median=float(sd.median()),
                sd_max=float(sd.max()),
                mean_steps=float(res.iterations[0].float().mean()),
            )
        return res

    original_clip = stochastic.SpikeClipper.__call__

    def clip(self, leaves):
        leaves = list(leaves)
        if step[0] >= first:
            with torch.no_grad():  # the parameters the step's gradient was taken at
                Phi = SBLDictionaryModel.dictionary({"V": leaves[0].detach()})
                gram = Phi.T @ Phi
                coherence = (gram - torch.diag(torch.diagonal(gram))).abs().max()
            row.update(
                gram_min=float(torch.linalg.eigvalsh(gram)[0]),
                coherence=float(coherence),
                beta=float(leaves[1].detach().exp()),
                grad_V=float(leaves[0].grad.norm()),
                grad_log_beta=float(leaves[1].grad.abs().sum()),
                rms=float((self.mean_square / (1 - self.decay ** max(self.steps, 1))).sqrt()),
            )
        hit = original_clip(self, leaves)
        if step[0] >= first:
            row.update(step=step[0], epoch=step[0] // batches_per_epoch, clipped=bool(hit))
            log.append(dict(row))
        step[0] += 1
        return hit

    unrolled.unrolled_solve = solve
    stochastic.SpikeClipper.__call__ = clip
    Y = camera_signals(16, 2, 512 + 64, args.seed)[:512]
    schedule = lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.999)  # noqa: E731
    est = pu.SparseBayesianDictionaryLearning(
        256,
        args.method,
        random_state=args.seed,
        dtype=torch.float64,
        monitor_size=256,
        monitor_every=10**6,
        progress=False,
        batch_size=128,
        max_iter=args.epochs,
        lr=0.03,
        lr_schedule=schedule,
        num_samples=1,
        unroll_steps=args.unroll_steps,
        mean_steps=args.mean_steps,
        mean_tol=args.mean_tol,
        noise_floor=args.noise_floor,
        estimator="output",
        alpha_step=0.25,
        alpha_step_decay=(50, 1),
        clip_spikes=10.0,
    ).fit(Y)
    last = est.history_[-1]["loglik"]
    mean = (
        f"mean to {args.mean_tol:g} posterior s.d. (at most {args.mean_steps} steps)"
        if args.mean_tol
        else f"mean {args.mean_steps} steps"
    )
    if args.method == "gradient_em":
        mean = "gradient EM (exact E-step: no mean solve, the residual columns are empty)"
    lines = [
        f"SBL dictionary, camera 16×16 patches, 256 atoms, T=512, seed {args.seed}, K=1, output "
        f"gradient, samples I={args.unroll_steps}, {mean}, CPU float64, torch "
        f"{torch.__version__}"
        + (f", noise variance ≥ {args.noise_floor:g}× the power" if args.noise_floor else "")
        + f". Per {args.stride} epoch(s) from {args.from_epoch}: medians over its steps, the "
        f"largest gradient norm, clipped steps; λ_min(ΦᵀΦ) and the largest |φ_iᵀφ_j| at its "
        f"last step. Training log-likelihood (256 signals) after epoch {args.epochs}: "
        f"{last:.1f}.",
        "",
        "| epoch | β | ‖r‖/‖b‖ | ‖r‖/√min A_ii (s.d.) | max s.d. | mean CG steps | "
        "max ‖∇V‖ | RMS | clipped | λ_min(ΦᵀΦ) | coherence |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for epoch in sorted({r["epoch"] // args.stride * args.stride for r in log}):
        rows = [r for r in log if r["epoch"] // args.stride * args.stride == epoch]

        def med(k: str, rows: list = rows) -> float:
            values = [r[k] for r in rows if k in r]
            return statistics.median(values) if values else math.nan

        def top(k: str, rows: list = rows) -> float:
            return max((r[k] for r in rows if k in r), default=math.nan)

        lines.append(
            f"| {epoch} | {med('beta'):.3g} | {med('rel_median'):.1e} | {med('sd_median'):.1e} "
            f"| {top('sd_max'):.1e} | {med('mean_steps'):.1f} "
            f"| {max(r['grad_V'] for r in rows):.3g} | {rows[-1]['rms']:.3g} "
            f"| {sum(r['clipped'] for r in rows)} | {rows[-1]['gram_min']:.3g} "
            f"| {rows[-1]['coherence']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        record = json.dumps(dict(args=vars(args), log=log), default=str)
        args.out.with_suffix(".json").write_text(record)
    if not math.isfinite(last):
        raise SystemExit("the fit ended non-finite")


if __name__ == "__main__":
    main()
