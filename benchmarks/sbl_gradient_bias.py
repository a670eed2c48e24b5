"""Diagnostic: bias of the unrolled network gradients against the exact Fisher gradient in sparse
Bayesian dictionary learning, at states reached by a real fit.

An unrolled K=1 fit (16×16 camera patches, 256 atoms, T=512, the README's long-fit settings:
I=10, ``alpha_step=0.25``, ``alpha_step_decay=(50, 1)``, ``variance_steps=20``,
``clip_spikes=10``) runs ``--epochs`` epochs; at its Φ, β and per-signal α, for one minibatch
of 128 signals, the script compares with gradient EM's exact gradient (batched Cholesky,
``fisher_objective``) the mean over ``--draws`` perturbation draws of

- the network gradient with ``grad="unroll"`` (backprop through the I CG steps) or
  ``grad="implicit"`` (one adjoint solve of I steps), and the output gradient
  (``estimator="output"``: no derivative through the solver, "output" in the grad column),
  each
- with the mean solves started at 0 ("cold"), at the fit's own warm starts (each signal's
  mean from its last step, "fit warm"), at those refined by ``--presolve`` CG steps at the
  current θ, or at the exact posterior means ("exact warm"),
- at I = ``--steps``.

Printed per case: ``|mean − exact| / |exact|`` for the dictionary gradient (V) and for
``log β`` with the Monte Carlo standard error on the same scale, the cosine to the exact
gradient, and the mean and exact ``∂/∂ log β``. A bias many standard errors wide is the
estimator's, not noise.

Usage: ``python benchmarks/sbl_gradient_bias.py --epochs 60 150 --presolve 5 10 20 --out
benchmarks/results``
(one state per process is quicker: two pinned processes, one ``--epochs`` each).
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import torch
from sbl_dictionary import camera_signals

import probunroll as pu
from probunroll.inference.gradient_em import fisher_objective
from probunroll.inference.unrolled import UnrolledConfig, unrolled_objective
from probunroll.linalg import cg
from probunroll.models.sbl_dictionary import SBLDictionaryModel


def fitted_state(epochs: int, seed: int) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """Signals, parameters ``{"V", "log_beta"}``, per-signal ``log α`` and the cached warm
    starts (each signal's last posterior mean) after an unrolled fit."""
    Y = camera_signals(16, 2, 512, seed)
    est = pu.SparseBayesianDictionaryLearning(
        256,
        "unrolled",
        max_iter=epochs,
        batch_size=128,
        lr=0.03,
        lr_schedule=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.999),
        num_samples=1,
        unroll_steps=10,
        variance_steps=20,
        clip_spikes=10.0,
        alpha_step=0.25,
        alpha_step_decay=(50, 1.0),
        random_state=seed,
        monitor_every=10**6,
        monitor_size=1,
        progress=False,
    ).fit(Y)
    params = {
        "V": est.components_.T.clone(),
        "log_beta": torch.tensor(math.log(est.noise_precision_), dtype=torch.float64),
    }
    means = est.means_.clone()
    return torch.as_tensor(Y, dtype=torch.float64), params, est.log_alpha_.clone(), means


def bias_rows(
    epochs: int, steps: list[int], draws: int, seed: int, presolve: list[int]
) -> list[str]:
    Y, params, log_alpha, fit_means = fitted_state(epochs, seed)
    batch = (Y[:128], torch.arange(128))
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    def gradient(value: torch.Tensor) -> list[torch.Tensor]:
        return [g.detach().reshape(-1) for g in torch.autograd.grad(value, list(leaves.values()))]

    exact = gradient(fisher_objective(SBLDictionaryModel(log_alpha.clone()), leaves, batch)[0])
    post = SBLDictionaryModel(log_alpha.clone()).exact_posterior(params, batch)
    beta = float(params["log_beta"].exp())
    rows = [
        f"After {epochs} unrolled epochs: β = {beta:.4g}, exact ∂/∂log β = {float(exact[1]):.4g}"
    ]
    rows += [
        "",
        "| mean solves start | grad | I | V: bias/‖exact‖ (s.e.) | V: cos | "
        "log β: bias / abs(exact) (s.e.) | log β: mean / exact |",
        "|---|---|---|---|---|---|---|",
    ]
    gen = torch.Generator().manual_seed(seed)
    starts = {"cold": None, "fit warm": fit_means}
    model = SBLDictionaryModel(log_alpha.clone())
    for extra in presolve:  # the fit's warm starts refined by `extra` CG steps at this θ
        refined = fit_means.clone()
        refined[:128] = cg(
            model.precision_operator(params, batch),
            model.rhs(params, batch).detach(),
            x0=fit_means[:128],
            M_inv=model.preconditioner_diag(params, batch).detach().reciprocal(),
            tol=None,
            max_iters=extra,
            grad="none",
            warn=False,
        ).x.detach()
        starts[f"fit warm + {extra} CG steps"] = refined
    starts["exact warm"] = torch.zeros_like(log_alpha)
    starts["exact warm"][:128] = post.mean
    errors = {}
    for start, means in starts.items():
        if means is not None:
            errors[start] = float((means[:128] - post.mean).norm() / post.mean.norm())
        for grad in ("unroll", "implicit", "output"):
            for I in steps:
                samples = []
                for _ in range(draws):
                    model = SBLDictionaryModel(log_alpha.clone())
                    model.means = None if means is None else means.clone()
                    how = {"estimator": "output"} if grad == "output" else {"grad": grad}
                    config = UnrolledConfig(1, I, warm_start=means is not None, **how)
                    samples.append(
                        gradient(unrolled_objective(model, leaves, batch, gen, config)[0])
                    )
                cells = []
                for j in range(2):
                    G = torch.stack([s[j] for s in samples])
                    mean, se = G.mean(0), G.std(0) / math.sqrt(draws)
                    scale = float(exact[j].norm())
                    bias = float((mean - exact[j]).norm()) / scale
                    cells.append(f"{bias:.3g} ({float(se.norm()) / scale:.2g})")
                    if j == 0:
                        cos = float(mean @ exact[0] / (mean.norm() * exact[0].norm()))
                        cells.append(f"{cos:.3f}")
                mean_beta = float(torch.stack([s[1] for s in samples]).mean())
                cells.append(f"{mean_beta:.4g} / {float(exact[1]):.4g}")
                rows.append(f"| {start} | {grad} | {I} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    notes = ", ".join(f"{start} {error:.3g}" for start, error in errors.items())
    return [*rows, "", f"Relative error of the starting means ‖μ₀ − μ*‖/‖μ*‖: {notes}."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[60, 150])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 30])
    p.add_argument("--draws", type=int, default=100)
    p.add_argument(
        "--presolve",
        type=int,
        nargs="*",
        default=[],
        help="also start from the fit's warm starts refined by this many CG steps",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    header = (
        f"SBL dictionary gradient bias, 16×16 camera patches, 256 atoms, T=512, K=1, "
        f"{args.draws} draws per case, one minibatch of 128; {platform.machine()} CPU, "
        f"{args.threads} thread(s), torch {torch.__version__}, float64, seed {args.seed}"
    )
    lines = [header, ""]
    for epochs in args.epochs:
        rows = bias_rows(epochs, args.steps, args.draws, args.seed, args.presolve)
        lines += [*rows, ""]
    args.out.mkdir(parents=True, exist_ok=True)
    name = "sbl_gradient_bias-" + "-".join(str(e) for e in args.epochs)
    name += "".join(f"-presolve{p}" for p in args.presolve) + ".md"
    (args.out / name).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
