"""Reconstruction plots for the model demos (matplotlib imported lazily; no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def plot_reconstruction(path: Path, truth: Tensor, fits: dict[str, Tensor], title: str) -> Path:
    """Plot a true signal (black dots) and each named estimate; write a PNG to ``path``.

    ``truth`` and the estimates have shape ``(D,)``. Uses a bare ``Figure`` (Agg canvas), so
    it neither needs a display nor changes the caller's pyplot backend.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    idx = torch.arange(truth.shape[-1])
    ax.plot(idx, truth.detach().cpu(), "k.", ms=6, label="truth")
    for (name, coef), marker in zip(fits.items(), ("rx", "b+", "g1"), strict=False):
        ax.plot(idx, coef.detach().cpu(), marker, ms=4, label=name)
    ax.set_title(title)
    ax.set_xlabel("coefficient")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
