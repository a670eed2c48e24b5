"""A minimal Adam loop shared by the unrolled coding modules (WLSC, LGN)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def train_unrolled(
    model: nn.Module,
    data: Tensor,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int | None = None,
    random_state: int | None = 0,
    targets: Tensor | None = None,
) -> list[float]:
    """Minimise ``model.loss(batch[, targets])`` with Adam; returns the mean loss per epoch.

    A model with a ``project_()`` method has it called after every optimiser step (projected
    gradient: e.g. WLSC keeps its learned step within FISTA's bound).

    ``batch_size=None`` trains full-batch. Mini-batches are drawn from a permutation seeded
    by ``random_state``, so the same seed gives the same run on CPU.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    n = data.shape[0]
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gen = torch.Generator().manual_seed(0 if random_state is None else int(random_state))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
        total = 0.0
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            args = (data[idx],) if targets is None else (data[idx], targets[idx])
            loss = model.loss(*args)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if hasattr(model, "project_"):
                model.project_()
            total += float(loss.detach()) * idx.numel()
        history.append(total / n)
    return history
