"""Diagnostic: is the unrolled estimate of ``∂ log p / ∂ log β`` biased at a fitted state?

A K=4 unrolled fit of the README recipe (``sbl_heldout_refit_depth.fit``: 16×16 camera
patches, 1024 atoms, T=2048 by default) runs ``--epochs`` epochs; at its Φ, β, per-signal α
and warm starts, for the first minibatch of 128 signals, the script compares the exact
Fisher gradient (batched Cholesky, ``fisher_objective``) with the mean over ``--draws``
perturbation draws of the unrolled objective's gradient, for the fit's own sample tolerance
and tighter ones. ``∂/∂ log β = N/2 − (β/2)·E‖y − Φz‖²`` per signal: samples solved short
of convergence carry too little posterior variance (a truncated CG solve of ``A x = ε``
misses the small-eigenvalue directions), so ``E‖y − Φz‖²`` comes out small and the log β
gradient too large, which pushes β up, worsens the conditioning and deepens the truncation.

Usage: ``python benchmarks/sbl_beta_gradient_bias.py --epochs 30 --sample-tols 0.1 0.01 0.001``
"""

from __future__ import annotations

import argparse
import math

import torch
from sbl_dictionary import camera_signals
from sbl_heldout_refit_depth import fit
from sbl_heldout_refit_depth import parse_args as depth_args

from probunroll.inference.gradient_em import fisher_objective
from probunroll.inference.unrolled import UnrolledConfig, unrolled_objective
from probunroll.models.sbl_dictionary import SBLDictionaryModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--atoms", type=int, default=1024)
    p.add_argument("--n-signals", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--sample-tols", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    p.add_argument("--unroll-steps", type=int, nargs="+", default=[40])
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # the refit-depth script's defaults: the K=4 recipe, samples to 0.1, lr 0.03 ×0.999
    fit_args = depth_args(["--atoms", str(args.atoms), "--seed", str(args.seed)])
    Y = camera_signals(args.patch, args.stride, args.n_signals, args.seed)
    est = fit(fit_args, Y, args.epochs)
    Yt = torch.as_tensor(Y, dtype=torch.float64)
    batch = (Yt[:128], torch.arange(128))
    params = {k: v.detach().clone() for k, v in est.params_.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    def dlogbeta(value: torch.Tensor) -> float:
        return float(torch.autograd.grad(value, leaves["log_beta"])[0])

    exact = dlogbeta(fisher_objective(SBLDictionaryModel(est.log_alpha_.clone()), leaves, batch)[0])
    print(
        f"After {args.epochs} epochs ({args.patch}×{args.patch}, {args.atoms} atoms): "
        f"log β = {float(params['log_beta']):.3f}; exact ∂/∂log β (mean per signal) = "
        f"{exact:.4g}",
        flush=True,
    )
    print("| sample tol | I (cap) | mean ∂/∂log β | s.e. | (mean − exact)/s.e. | CG steps |")
    print("|---|---|---|---|---|---|", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    for I in args.unroll_steps:
        for tol in args.sample_tols:
            config = UnrolledConfig(
                num_samples=4,
                unroll_steps=I,
                warm_start=True,
                estimator="output",
                mean_steps=250,
                mean_tol=1e-3,
                mean_round=25,
                sample_tol=tol,
                preconditioner="shared",
            )
            values, steps = [], []
            for _ in range(args.draws):
                model = SBLDictionaryModel(est.log_alpha_.clone())
                model.means = est.means_.clone()
                value, info = unrolled_objective(model, leaves, batch, gen, config)
                values.append(dlogbeta(value))
                steps.append(float(info["cg_iterations"].float().mean()))
            G = torch.tensor(values, dtype=torch.float64)
            mean, se = float(G.mean()), float(G.std() / math.sqrt(args.draws))
            print(
                f"| {tol:g} | {I} | {mean:.4g} | {se:.2g} | {(mean - exact) / se:+.1f} | "
                f"{sum(steps) / len(steps):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
