"""The SAE section of ``probunroll demo``: MP-SAE vs TopK on sklearn's digits."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from probunroll.sae import metrics
from probunroll.sae.mp import MatchingPursuitSAE
from probunroll.sae.topk import TopKSAE
from probunroll.sae.train import train

__all__ = ["demo"]

KS = (1, 2, 5, 10, 20)


def _ev_curve(model, x: torch.Tensor) -> list[tuple[float, float]]:
    with torch.no_grad():
        out = []
        for k in KS:
            z = model.encode(x, k=k)
            out.append(
                (float(metrics.l0(z)), float(metrics.explained_variance(x, model.decode(z))))
            )
    return out


def _plot(out_dir: Path, curves: dict[str, list[tuple[float, float]]], models: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (non-zeros per code, test)")
    ax.set_ylabel("explained variance (test)")
    ax.set_title("digits, c=256, trained at k=5; k varied at inference")
    ax.legend()
    fig.tight_layout()
    pareto = out_dir / "sae_pareto.png"
    fig.savefig(pareto, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(2, 16, figsize=(12, 1.8))
    for row, (name, model) in zip(axes, models.items(), strict=True):
        atoms = model.dictionary.detach()[:16].reshape(16, 8, 8).cpu().numpy()
        for ax, atom in zip(row, atoms, strict=True):
            lim = float(abs(atom).max())
            ax.imshow(atom, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, rotation=0, ha="right", va="center")
    fig.tight_layout()
    grid = out_dir / "sae_atoms.png"
    fig.savefig(grid, dpi=120)
    plt.close(fig)
    return [pareto, grid]


def demo(out_dir: str | Path, steps: int = 150, verbose: bool = True) -> list[dict[str, Any]]:
    """Train an MP-SAE and a TopK SAE (c = 256, k = 5) on digits for a few seconds, print and
    return explained variance against the inference-time k, and write ``sae_pareto.png``
    (EV vs L0) and ``sae_atoms.png`` (learned atoms) into ``out_dir``.

    Returns
    -------
    list of dict
        One row per (model, k): ``model``, ``k``, ``l0``, ``explained_variance``, ``seconds``.
    """
    from probunroll.data import load_digits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train, x_test = load_digits()
    models = {
        "MP-SAE": MatchingPursuitSAE(64, 256, 5, random_state=0),
        "TopK": TopKSAE(64, 256, 5, random_state=0),
    }
    rows, curves = [], {}
    for name, model in models.items():
        t0 = time.perf_counter()
        train(model, x_train, steps=steps, batch_size=128, lr=5e-3, log_every=steps, progress=False)
        seconds = time.perf_counter() - t0
        curves[name] = _ev_curve(model, x_test)
        for k, (l0, ev) in zip(KS, curves[name], strict=True):
            rows.append(
                {"model": name, "k": k, "l0": l0, "explained_variance": ev, "seconds": seconds}
            )
    paths = _plot(out, curves, models)
    if verbose:
        print("SAE on digits (c=256, trained at k=5): test explained variance vs inference k")
        print("  k      " + "".join(f"{k:>7d}" for k in KS))
        for name in models:
            print(f"  {name:<7}" + "".join(f"{ev:7.3f}" for _, ev in curves[name]))
        print("  wrote " + ", ".join(str(p) for p in paths))
    return rows
