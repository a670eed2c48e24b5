"""Overlay monitored curves from several benchmark runs (``unrolling.py`` or
``sbl_dictionary.py`` JSON) in one plot, against seconds or against epochs.

Runs with different thread counts, or stopped at different budgets, cannot share a seconds
axis honestly; their epochs can (every stochastic method here is deterministic given its
seeds, so an epoch's value does not depend on the thread count). Each curve is named on the
command line::

    python benchmarks/plot_curves.py --x epoch --out epochs.png \\
        "gradient EM=benchmarks/results/run-gem.json" \\
        "unrolled I=10=benchmarks/results/run-u.json#unrolled"

``LABEL=PATH`` takes the file's only method (``PATH#METHOD`` picks one); the marker on each
curve is its best value. Prints each curve's best (value, epoch, seconds) and its last.
A ``PATH`` ending in ``.log`` is a benchmark's log (the monitored values it logs as they come,
``HH:MM:SS METHOD: epoch E, S s, loglik L``): the curve of a run stopped before it wrote its
JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from probunroll.inference.stochastic import MONITOR_LOG_PATTERN


def parse_log(path: str, method: str) -> list[dict]:
    """The monitored rows a benchmark logged (``stochastic.run_epochs``' INFO lines)."""
    rows: dict[str, list[dict]] = {}
    for line in Path(path).read_text().splitlines():
        if m := MONITOR_LOG_PATTERN.search(line.strip()):
            row = {"iteration": int(m[2]), "seconds": float(m[3]), "loglik": float(m[4])}
            rows.setdefault(m[1], []).append(row)
    if not method:
        if len(rows) != 1:
            raise SystemExit(f"{path}: logs {sorted(rows) or 'no monitored values'}; pick one")
        method = next(iter(rows))
    if method not in rows:
        raise SystemExit(f"{path}: no logged method {method!r} (it holds {sorted(rows)})")
    return rows[method]


def parse_curve(spec: str, key: str, atoms: str | None) -> tuple[str, list[dict]]:
    """``LABEL=PATH[#METHOD]`` → ``(label, monitored rows)``; the label may contain ``=``."""
    label, sep, rest = spec.rpartition("=")
    if not sep or not label:
        raise SystemExit(f"{spec!r}: expected LABEL=PATH or LABEL=PATH#METHOD")
    path, _, method = rest.partition("#")
    if path.endswith(".log"):
        if key != "loglik":
            raise SystemExit(f"{path}: a log holds only 'loglik'")
        return label, parse_log(path, method)
    curves = json.loads(Path(path).read_text())["curves"]
    if atoms is None:
        if len(curves) != 1:
            raise SystemExit(f"{path}: holds sizes {sorted(curves)}; pick one with --atoms")
        atoms = next(iter(curves))
    if atoms not in curves:
        raise SystemExit(f"{path}: no size {atoms} (it holds {sorted(curves)})")
    methods = [m for m in curves[atoms] if m != "target"]
    if not method:
        if len(methods) != 1:
            raise SystemExit(f"{path}: holds {methods}; pick one with {path}#METHOD")
        method = methods[0]
    if method not in methods:
        raise SystemExit(f"{path}: no method {method!r} (it holds {methods})")
    rows = [r for r in curves[atoms][method] if key in r]
    if not rows:
        raise SystemExit(f"{path}#{method}: no monitored {key!r}")
    return label, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("curves", nargs="+", metavar="LABEL=PATH[#METHOD]")
    p.add_argument("--x", choices=["epoch", "seconds"], default="epoch")
    p.add_argument("--key", default="loglik", help="the history column to plot")
    p.add_argument("--atoms", help="the size (JSON key) to take from files with several")
    p.add_argument("--ylabel", default="held-out log-likelihood / signal")
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, spec in enumerate(args.curves):
        label, rows = parse_curve(spec, args.key, args.atoms)
        x = [r["iteration"] + 1 if args.x == "epoch" else r["seconds"] for r in rows]
        y = [r[args.key] for r in rows]
        best = max(range(len(y)), key=y.__getitem__)
        ax.plot(x, y, marker=".", color=f"C{i}", label=label)
        ax.plot(x[best], y[best], marker="*", ms=11, color=f"C{i}")
        print(
            f"{label}: best {y[best]:.1f} at epoch {rows[best]['iteration']} "
            f"({rows[best]['seconds']:.0f} s); last {y[-1]:.1f} at epoch "
            f"{rows[-1]['iteration']} ({rows[-1]['seconds']:.0f} s)"
        )
    ax.set_xlabel("epochs" if args.x == "epoch" else "seconds (fitting only)")
    if args.x == "seconds":
        ax.set_xscale("log")
    ax.set_ylabel(args.ylabel)
    ax.set_title(args.title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
