"""Benchmark: clustered multi-task compressive sensing, CoFEM against exact EM.

C = 2 clusters, orthonormal DCT, a random mask per task keeping 25% or 50% of the entries, 5%
support per cluster, σ = 0.05 (β = 400 fixed), 30 EM iterations, K = 15 probes shared across
clusters, float64, same data and same process for every method:

- (a) ``em-DxD``: exact EM with the C·T posterior precisions (D×D) factorised by Cholesky each
  iteration (the multics EM, without its explicit inverse);
- (b) ``em-woodbury``: exact EM through the M×M matrices over each task's M observed entries;
- ``cofem``: probunroll's covariance-free EM.

A run whose one-iteration probe predicts more than ``--budget`` seconds is timed on the probe
only (time marked ``~``, per-iteration ratios still exact, accuracy blank); a method whose
dense factors would exceed ``--max-gib`` is not run, and its row says so ("skipped: needs
X GiB"). Peak memory is the extra resident memory of a 1-iteration fit in a fresh (spawned)
process, data excluded. Accuracy is the cluster accuracy under the best relabelling; NMSE is
over all tasks (assigned-cluster means). (a) and (b) compute the same exact posterior, so where
both finish their accuracy and NMSE agree.

Usage: ``python benchmarks/cmtcs.py [--sizes 256 1024 2048] [--tasks 20 100]
[--observed 0.25 0.5] [--methods em-DxD em-woodbury cofem] [--threads 1] [--budget 120]
[--max-gib 6] [--name cmtcs]``. Writes ``benchmarks/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _lgm

import probunroll as pu
from probunroll.data.synthetic import make_cmtcs_problem
from probunroll.models.cmtcs import cluster_accuracy

ITERS = 30
FORMS = {
    "em-DxD": ("em", "precision"),
    "em-woodbury": ("em", "woodbury"),
    "cofem": ("cofem", "auto"),
}


def dense_gib(method: str, d: int, t: int, m: int) -> float:
    """Rough size of the dense factors an exact E-step holds (float64, C = 2)."""
    if method == "em-DxD":
        return 3 * 2 * t * d * d * 8 / 2**30
    if method == "em-woodbury":
        return (2 * 2 * t * m * d + 2 * t * m * m) * 8 / 2**30
    return 0.0


def make_fit(method: str, prob):
    kind, form = FORMS[method]

    def fit(max_iter: int):
        est = pu.ClusteredMultiTaskCS(
            2,
            kind,
            max_iter=max_iter,
            num_probes=15,
            noise_precision=400.0,
            em_form=form,
            random_state=0,
            progress=False,
        )
        return est.fit(prob.Phi, prob.Y, masks=prob.masks)

    return fit


def one_iteration_fit(method: str, d: int, t: int, obs: float):
    """For the memory measurement in a fresh process: the data, and a 1-iteration fit."""
    prob = make_cmtcs_problem(d, t, 2, observed_fraction=obs, random_state=0)
    fit = make_fit(method, prob)
    return lambda: fit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--tasks", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--observed", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument(
        "--methods", nargs="+", choices=list(FORMS), default=list(FORMS), help="methods to run"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--max-gib", type=float, default=6.0)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--name", default="cmtcs", help="results file benchmarks/results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for d in args.sizes:
        for t in args.tasks:
            for obs in args.observed:
                prob = make_cmtcs_problem(d, t, 2, observed_fraction=obs, random_state=0)
                m = round(obs * d)
                results = {}
                for method in args.methods:
                    gib = dense_gib(method, d, t, m)
                    if gib > args.max_gib:
                        row = {"D": d, "T": t, "observed": obs, "method": method}
                        row["skipped"] = f"needs {gib:.1f} GiB > --max-gib {args.max_gib:g}"
                        rows.append(row)
                        print(f"{row}", flush=True)
                        continue
                    fit = make_fit(method, prob)
                    res = _lgm.timed(fit, ITERS, args.budget)
                    row = {
                        "D": d,
                        "T": t,
                        "observed": obs,
                        "method": method,
                        "seconds": res["full_seconds"],
                        "per_iter": res["per_iter"],
                        "cpu_per_iter": res["cpu_per_iter"],
                        "extrapolated": res["extrapolated"],
                    }
                    if res["est"] is not None:
                        est = res["est"]
                        err = float(((est.coef_ - prob.X) ** 2).sum() / (prob.X**2).sum())
                        row.update(
                            nmse=err,
                            rel_error=err**0.5,
                            accuracy=cluster_accuracy(est.labels_, prob.labels),
                        )
                    if not args.no_memory:
                        row["peak_mib"] = _lgm.peak_memory_mib(
                            one_iteration_fit, (method, d, t, obs), args.threads
                        )
                    results[method] = row
                    rows.append(row)
                    print(f"{row}", flush=True)
                cofem = results.get("cofem")  # absent when --methods leaves it out
                for row in results.values():
                    if cofem is None:
                        break
                    row["cofem_speedup"] = row["per_iter"] / cofem["per_iter"]
                    row["cofem_speedup_cpu"] = row["cpu_per_iter"] / cofem["cpu_per_iter"]
                    if "peak_mib" in row and "peak_mib" in cofem:
                        row["memory_ratio"] = row["peak_mib"] / max(cofem["peak_mib"], 1.0)
    for row in rows:
        if "skipped" in row:
            row["time"] = f"skipped: {row['skipped']}"
        else:
            row["time"] = ("~" if row["extrapolated"] else "") + f"{row['seconds']:.2f}"
    table = _lgm.markdown(
        rows,
        [
            ("D", "D", ""),
            ("T", "T", ""),
            ("observed", "obs.", ".2f"),
            ("method", "method", ""),
            ("time", "time 30 it (s)", ""),
            ("per_iter", "s/iter", ".4f"),
            ("cofem_speedup", "× CoFEM (per iter)", ".1f"),
            ("cpu_per_iter", "CPU s/iter", ".4f"),
            ("cofem_speedup_cpu", "× CoFEM (CPU)", ".1f"),
            ("peak_mib", "peak MiB", ".0f"),
            ("memory_ratio", "mem × CoFEM", ".1f"),
            ("accuracy", "accuracy", ".2f"),
            ("nmse", "NMSE", ".4f"),
            ("rel_error", "rel. error", ".3f"),
        ],
    )
    path = _lgm.write(args.name, rows, vars(args))
    print(
        f"\nCMTCS, C=2, DCT, 5% support, σ=0.05, K=15 shared probes, float64, "
        f"{args.threads} thread(s); ~ = extrapolated from 1 iteration\n"
    )
    print(table)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
