"""Benchmark: probunroll's batched CG against gpytorch's linear_cg and dense Cholesky.

Batches of 32 SPD systems at n ∈ {512, 2048, 8192}, two operator families:

- ``dense``: one dense SPD matrix (κ ≈ 10³) shared by 32 right-hand sides (matvec = GEMM);
- ``dct``: 32 distinct masked-DCT SBL precisions β Cᵀ diag(ω_t) C + diag(α_t) applied
  matrix-free (O(n log n) per matvec), Jacobi preconditioner from the exact Gram diagonal.

Every method must reach the same *per-system* accuracy: each system's true relative residual
≤ tol. linear_cg stops on the mean residual over the batch, so its tolerance is tightened
(÷10 at a time) until its worst system meets tol; the reported time is that of the run that
does. "overhead" is CG time divided by the time of the bare matvecs it performed (same
operator, same batch, same count), i.e. the cost of everything CG does besides A·p.

Usage: ``python benchmarks/cg.py [--sizes 512 2048 8192] [--threads 2] [--dtype float64]``.
Writes ``benchmarks/results/cg.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

import probunroll as pu

TOL = 1e-6
BATCH = 32


DEVICE = torch.device("cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), out


def dense_problem(n, dtype, g):
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=dtype, generator=g).to(DEVICE))
    ev = torch.logspace(0, 3, n, dtype=dtype, device=DEVICE)
    A = (Q * ev) @ Q.T
    A = (A + A.T) / 2
    B = torch.randn(BATCH, n, dtype=dtype, generator=g).to(DEVICE)
    return A, B, torch.diagonal(A).clone(), None


def dct_problem(n, dtype, g):
    dct = pu.operators.DCT(n)
    omega = (torch.rand(BATCH, n, generator=g) < 0.5).to(DEVICE, dtype)
    alpha = torch.full((BATCH, n), 1e4, dtype=dtype)
    active = torch.rand(BATCH, n, generator=g) < 0.05
    alpha[active] = torch.exp(torch.randn(int(active.sum()), generator=g)).to(dtype)
    alpha = alpha.to(DEVICE)
    beta = 400.0

    def matvec(v):
        return beta * dct.T(omega * dct(v)) + alpha * v

    diag = beta * dct.gram_diagonal(omega) + alpha
    B = torch.randn(BATCH, n, dtype=dtype, generator=g).to(DEVICE)

    def dense():
        C = dct.to_dense(dtype=dtype, device=DEVICE)
        return beta * C.T @ (omega[:, :, None] * C) + torch.diag_embed(alpha)

    return matvec, B, diag, dense


def rel_residual(matvec, B, X):
    return torch.linalg.vector_norm(B - matvec(X), dim=-1) / torch.linalg.vector_norm(B, dim=-1)


def run_linear_cg(A_or_mv, B, diag, shared):
    from linear_operator.utils.linear_cg import linear_cg

    if shared:  # one matrix, rhs as columns (n, k)
        closure = A_or_mv
        rhs = B.T.contiguous()
        pre = lambda r: r / diag[:, None]  # noqa: E731

        def to_rows(x):
            return x.T
    else:  # a batch of operators: rhs (batch, n, 1)
        mv = A_or_mv

        def closure(x):
            return mv(x.squeeze(-1)).unsqueeze(-1)

        rhs = B.unsqueeze(-1)
        pre = lambda r: r / diag.unsqueeze(-1)  # noqa: E731

        def to_rows(x):
            return x.squeeze(-1)

    tol = TOL
    for _ in range(8):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, x = best_of(
                lambda tol=tol: linear_cg(
                    closure,
                    rhs,
                    tolerance=tol,
                    eps=1e-300,
                    stop_updating_after=1e-300,
                    max_iter=10 * B.shape[-1],
                    preconditioner=pre,
                ),
                1,
            )
        X = to_rows(x)
        yield tol, t, X
        tol /= 10


def bench(kind, n, dtype, repeats):
    g = torch.Generator().manual_seed(n)
    if kind == "dense":
        A, B, diag, _ = dense_problem(n, dtype, g)

        def matvec(v):
            return v @ A  # A symmetric

        dense_matrix = lambda: A  # noqa: E731
    else:
        matvec, B, diag, dense_matrix = dct_problem(n, dtype, g)
    row = {"operator": kind, "n": n, "batch": BATCH}

    t_ours, res = best_of(
        lambda: pu.linalg.cg(matvec, B, M_inv=1 / diag, tol=TOL, grad="none"), repeats
    )
    r = rel_residual(matvec, B, res.x)
    assert float(r.max()) <= TOL, float(r.max())
    extra = res.steps // 50  # residual replacements (the true residual is computed lazily)
    n_mv = res.steps + extra
    P = torch.randn_like(B)
    t_mv, _ = best_of(lambda: [matvec(P) for _ in range(n_mv)], repeats)
    row.update(
        probunroll_s=t_ours,
        iterations=f"{int(res.iterations.min())}-{int(res.iterations.max())}",
        matvecs=n_mv,
        bare_matvecs_s=t_mv,
        overhead=t_ours / t_mv,
    )

    try:
        for tol, t_lc, X in run_linear_cg(
            A if kind == "dense" else matvec, B, diag, kind == "dense"
        ):
            worst = float(rel_residual(matvec, B, X).max())
            if worst <= TOL:
                row.update(linear_cg_s=t_lc, linear_cg_tol=tol, ratio_linear_cg=t_lc / t_ours)
                break
        else:
            row.update(
                linear_cg_s=None, linear_cg_note=f"worst residual {worst:.1e} at tol {tol:g}"
            )
    except ImportError:
        row.update(linear_cg_s=None, linear_cg_note="linear_operator not installed")

    mem = 8 * n * n * (1 if kind == "dense" else BATCH)
    if mem <= (8e9 if DEVICE.type == "cuda" else 2e9):

        def chol():
            M = dense_matrix()
            L = torch.linalg.cholesky(M)
            rhs = B.T if M.ndim == 2 else B.unsqueeze(-1)
            return torch.cholesky_solve(rhs, L)

        t_ch, _ = best_of(chol, max(1, repeats // 2))
        row.update(cholesky_s=t_ch, ratio_cholesky=t_ch / t_ours)
    else:
        row.update(cholesky_s=None)
    return row


def fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--kinds", nargs="+", default=["dense", "dct"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if DEVICE.type == "cuda":
        machine = f"{torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}"
    else:
        cpu = platform.processor() or platform.machine()
        machine = f"{cpu} CPU, {args.threads} threads, torch {torch.__version__}"
    rows = []
    for kind in args.kinds:
        for n in args.sizes:
            row = bench(kind, n, dtype, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nbatched CG, {BATCH} systems, per-system tol {TOL:g}, {args.dtype}, {machine}\n")
    print(
        "| operator | n | iterations | probunroll CG (s) | overhead vs bare matvecs | "
        "linear_cg (s) | linear_cg / ours | Cholesky (s) | Cholesky / ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['operator']} | {r['n']} | {r['iterations']} | {fmt(r['probunroll_s'])} | "
            f"{fmt(r['overhead'], '.2f')}× | {fmt(r.get('linear_cg_s'))} | "
            f"{fmt(r.get('ratio_linear_cg'), '.2f')}× | {fmt(r.get('cholesky_s'))} | "
            f"{fmt(r.get('ratio_cholesky'), '.1f')}× |"
        )
    if args.out is None:
        args.out = Path(__file__).parent / "results" / f"cg-{DEVICE.type}-{args.dtype}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": machine, "dtype": args.dtype, "tol": TOL, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
