"""The ``probunroll`` command line.

``probunroll demo [--out DIR] [--only SECTION ...]`` runs each capability on an embedded
default problem, prints a table per section and writes its plots into DIR
(default ``./probunroll-demo``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from pathlib import Path

__all__ = ["main"]

# section name -> (module, title); each module provides demo(out_dir) -> list[dict]
SECTIONS: dict[str, tuple[str, str]] = {
    "core": ("probunroll.linalg.demo", "Solver core: batched CG and log-determinants"),
    "sbl": ("probunroll.models.sbl", "Sparse Bayesian learning: exact EM vs covariance-free EM"),
    "cmtcs": (
        "probunroll.models.cmtcs",
        "Clustered multi-task compressive sensing: exact EM vs covariance-free EM",
    ),
    "fa": (
        "probunroll.models.fa_demo",
        "Factor analysis with missing data: EM vs gradient EM vs probabilistic unrolling",
    ),
    "sae": ("probunroll.sae.demo", "Sparse autoencoders on digits: explained variance vs sparsity"),
}


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    rows = [{k: _cell(v) for k, v in r.items()} for r in rows]
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| "
        + " | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True))
        + " |"
        for r in rows
    ]
    return "\n".join([line, sep, *body])


def run_demo(out_dir: Path, only: list[str] | None = None) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = only or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown section(s): {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        return 2
    for name in names:
        module, title = SECTIONS[name]
        print(f"\n## {title}\n", flush=True)
        t0 = time.perf_counter()
        demo = importlib.import_module(module).demo
        quiet = {"verbose": False} if "verbose" in inspect.signature(demo).parameters else {}
        rows = demo(out_dir, **quiet)
        print(_table(rows))
        print(f"\n({time.perf_counter() - t0:.1f} s)", flush=True)
    plots = sorted(p.name for p in out_dir.glob("*.png"))
    print(f"\nplots written to {out_dir.resolve()}: {', '.join(plots)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probunroll", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run every capability on an embedded default problem")
    p_demo.add_argument("--out", type=Path, default=Path("probunroll-demo"), help="plot folder")
    p_demo.add_argument("--only", nargs="+", metavar="SECTION", help=f"among {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    if args.command == "demo":
        import torch

        torch.set_num_threads(min(4, torch.get_num_threads()))
        return run_demo(args.out, args.only)
    return 1


if __name__ == "__main__":
    sys.exit(main())
