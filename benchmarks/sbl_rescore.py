"""Rescore a dictionary-learning benchmark run's saved states with a deeper held-out refit.

``benchmarks/sbl_dictionary.py --heldout H --heldout-refit R --save-states --out RUN`` keeps
every monitored Φ, β in ``RUN/states/``. The monitor's R EM α steps give a lower bound on each
held-out signal's evidence ``max_α log N(y; 0, Φ diag(α)⁻¹ Φᵀ + β⁻¹ I)`` that loosens as β
grows (``benchmarks/sbl_heldout_refit_depth.py``: R=50 was 3–21% below R=400 on 16×16 patches,
1024 atoms), so a time-to-target ratio under a shallow monitor compares lower bounds. This
script scores each saved state on the same H held-out patches with ``--depth`` EM α steps from
scratch (:func:`probunroll.models.sbl_dictionary.fit_local_precisions`, as ``score`` does), in
``--workers`` processes of one thread each, and writes ``RUN/sbl_dictionary-refit{depth}.json``:
the run's JSON with each monitored ``loglik`` replaced by the deeper value (the monitor's kept
as ``loglik_refit{R}``). The fits' ``seconds`` are unchanged: the rescoring is untimed, as the
monitor is. Then::

    python benchmarks/sbl_dictionary.py --from-json RUN/sbl_dictionary-refit400.json \\
        --heldout H --heldout-refit 400 --out RUN/refit400

prints the time-to-target table under the deeper monitor.

Usage: ``python benchmarks/sbl_rescore.py RUN --depth 400 --workers 2``
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from sbl_dictionary import KEY, camera_signals
from unrolling import rows_for

from probunroll.models.sbl_dictionary import SBLDictionaryModel, fit_local_precisions


def held_out(saved_args: dict) -> tuple[torch.Tensor, float]:
    """The run's held-out patches (H, N) and the fits' initial ``log α₀`` (from the training
    patches' power, as the estimator sets it)."""
    n, h = int(saved_args["n_signals"]), int(saved_args["heldout"])
    if h < 1:
        raise SystemExit("the run has no held-out signals (--heldout 0): nothing to rescore")
    Y = camera_signals(
        int(saved_args["patch"]), int(saved_args["stride"]), n + h, int(saved_args["seed"])
    )
    Y = torch.as_tensor(Y, dtype=torch.float64)
    return Y[n:], float(Y[:n].square().mean())


def score_state(
    path: Path, Y_val: torch.Tensor, power: float, depth: int, device: str = "cpu"
) -> tuple[str, int, int, float, float]:
    """``(method, D, iteration, held-out log-likelihood per signal, seconds)`` of one state."""
    torch.set_num_threads(1)
    state = torch.load(path, map_location=device)
    Phi = state["components"].T.to(torch.float64)  # (N, D), unit atoms
    Y_val = Y_val.to(device)
    N, D = Phi.shape
    params = {
        "V": Phi,
        "log_beta": torch.tensor(
            math.log(state["noise_precision"]), dtype=torch.float64, device=device
        ),
    }
    log_alpha0 = -math.log(power * N / D)
    start = time.perf_counter()
    model = SBLDictionaryModel(torch.zeros(1, D, dtype=torch.float64, device=device))
    _, _, values = fit_local_precisions(model, params, Y_val, log_alpha0, n_iter=depth, tol=0.0)
    seconds = time.perf_counter() - start
    return (
        state["method"],
        int(state["D"]),
        int(state["row"]["iteration"]),
        float(values.mean()),
        seconds,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the --out folder of a --save-states run")
    p.add_argument("--depth", type=int, default=400, help="EM α steps per held-out signal")
    p.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    p.add_argument("--device", default="cpu", help="cuda: score on the GPU (with --workers 1)")
    p.add_argument(
        "--every", type=int, default=1, help="score every k-th state of a method (and its last)"
    )
    args = p.parse_args()
    saved = json.loads((args.run / "sbl_dictionary.json").read_text())
    Y_val, power = held_out(saved["args"])
    shallow = saved["args"].get("heldout_refit")
    paths = sorted((args.run / "states").glob("*.pt"))
    if not paths:
        raise SystemExit(
            f"no states in {args.run / 'states'}: run sbl_dictionary.py with --save-states"
        )
    by_run: dict[tuple[str, str], list[Path]] = {}
    for path in paths:
        method, D, _ = path.stem.rsplit("-", 2)
        by_run.setdefault((method, D), []).append(path)
    chosen = [
        p
        for group in by_run.values()
        for i, p in enumerate(group)
        if i % args.every == 0 or i == len(group) - 1
    ]
    print(f"{len(chosen)} states, {args.depth} α steps each, {args.workers} worker(s)", flush=True)
    scores: dict[tuple[str, int, int], float] = {}
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = [
            pool.submit(score_state, path, Y_val, power, args.depth, args.device) for path in chosen
        ]
        for job in jobs:
            method, D, it, value, seconds = job.result()
            scores[(method, D, it)] = value
            print(f"{method:12s} D={D} epoch {it:5d}: {value:.3f} ({seconds:.0f} s)", flush=True)
    curves = {}
    for D, by_method in saved["curves"].items():
        curves[D] = {}
        for method, history in by_method.items():
            if method == "target":
                continue
            rows = []
            for row in history:
                row = dict(row)
                if KEY in row:
                    old = row.pop(KEY)
                    row.pop("heldout_loglik", None)
                    row[f"loglik_refit{shallow}"] = old
                    value = scores.get((method, int(D), int(row["iteration"])))
                    if value is not None:  # states not chosen (--every) leave no value
                        row[KEY] = row["heldout_loglik"] = value
                rows.append(row)
            curves[D][method] = rows
    out = args.run / f"sbl_dictionary-refit{args.depth}.json"
    saved_args = dict(saved["args"], heldout_refit=args.depth, rescored_from=shallow)
    rows = [r for D in curves for r in rows_for(int(D), curves[D], KEY)]
    header = saved.get("header", "").replace(
        f"refitted by {shallow} α steps", f"refitted by {args.depth} α steps (rescored)"
    )
    out.write_text(
        json.dumps(
            {"args": saved_args, "header": header, "rows": rows, "curves": curves},
            indent=1,
            default=str,
        )
    )
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
