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

The estimators (``--estimators``, ``--grad``): the output gradient, the network gradient,
and the network gradient for the samples only (``network_samples``), whose sample term's error
is second order in the samples' truncation error (``probunroll.inference.unrolled``). The
fitted state is cached in ``/tmp`` (keyed by patch, atoms, T and epochs) for the next run.

Usage: ``python benchmarks/sbl_beta_gradient_bias.py --epochs 30 --sample-tols 0.1 0.01 0.001``
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
from sbl_dictionary import camera_signals
from sbl_heldout_refit_depth import fit
from sbl_heldout_refit_depth import parse_args as depth_args

from probunroll.inference.gradient_em import fisher_objective
from probunroll.inference.unrolled import ESTIMATORS, UnrolledConfig, unrolled_objective
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
    p.add_argument(
        "--estimators", nargs="+", default=["output", "network_samples"], choices=ESTIMATORS
    )
    p.add_argument("--grad", choices=["unroll", "implicit"], default="unroll")
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # the refit-depth script's defaults: the K=4 recipe, samples to 0.1, lr 0.03 ×0.999
    fit_args = depth_args(["--atoms", str(args.atoms), "--seed", str(args.seed)])
    Y = camera_signals(args.patch, args.stride, args.n_signals, args.seed)
    cache = f"/tmp/sbl_beta_bias_p{args.patch}_a{args.atoms}_t{args.n_signals}_e{args.epochs}.pt"
    try:  # the fitted state: θ, per-signal α and the warm starts
        state = torch.load(cache)
    except FileNotFoundError:
        est = fit(fit_args, Y, args.epochs)
        state = {"params": est.params_, "log_alpha": est.log_alpha_, "means": est.means_}
        torch.save(state, cache)
    Yt = torch.as_tensor(Y, dtype=torch.float64)
    batch = (Yt[:128], torch.arange(128))
    params = {k: v.detach().clone() for k, v in state["params"].items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    def dlogbeta(value: torch.Tensor) -> float:
        return float(torch.autograd.grad(value, leaves["log_beta"])[0])

    exact_model = SBLDictionaryModel(state["log_alpha"].clone())
    exact = dlogbeta(fisher_objective(exact_model, leaves, batch)[0])
    print(
        f"After {args.epochs} epochs ({args.patch}×{args.patch}, {args.atoms} atoms): "
        f"log β = {float(params['log_beta']):.3f}; exact ∂/∂log β (mean per signal) = "
        f"{exact:.4g}",
        flush=True,
    )
    print(
        "| estimator | sample tol | I (cap) | mean ∂/∂log β | s.e. | (mean − exact)/s.e. "
        "| CG steps | s/draw |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    for estimator, I, tol in itertools.product(
        args.estimators, args.unroll_steps, args.sample_tols
    ):
        config = UnrolledConfig(
            num_samples=4,
            unroll_steps=I,
            warm_start=True,
            estimator=estimator,
            grad=args.grad,
            mean_steps=250,
            mean_tol=1e-3,
            mean_round=25,
            sample_tol=tol,
            preconditioner="shared",
        )
        values, steps = [], []
        start = time.perf_counter()
        for _ in range(args.draws):
            model = SBLDictionaryModel(state["log_alpha"].clone())
            model.means = state["means"].clone()
            value, info = unrolled_objective(model, leaves, batch, gen, config)
            values.append(dlogbeta(value))
            steps.append(float(info["cg_iterations"].float().mean()))
        seconds = (time.perf_counter() - start) / args.draws
        G = torch.tensor(values, dtype=torch.float64)
        mean, se = float(G.mean()), float(G.std() / math.sqrt(args.draws))
        label = estimator if estimator == "output" else f"{estimator} ({args.grad})"
        print(
            f"| {label} | {tol:g} | {I} | {mean:.4g} | {se:.2g} | "
            f"{(mean - exact) / se:+.1f} | {sum(steps) / len(steps):.1f} | {seconds:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
