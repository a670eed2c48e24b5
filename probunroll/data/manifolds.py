"""Low-dimensional manifolds embedded in the plane: a ring and two moons."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ring", "two_moons"]


def _generator(random_state: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(0 if random_state is None else int(random_state))


def ring(
    n_samples: int = 200,
    noise: float = 0.0,
    random_state: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Points on the unit circle at evenly spaced angles, plus optional Gaussian noise.

    Returns
    -------
    X : Tensor, shape (n_samples, 2)
    angles : Tensor, shape (n_samples,)
        The angle in [0, 2π) of each point (the latent variable).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    angles = torch.arange(n_samples, dtype=dtype) * (2 * math.pi / n_samples)
    X = torch.stack([angles.cos(), angles.sin()], dim=1)
    if noise > 0:
        X = X + noise * torch.randn(X.shape, generator=_generator(random_state), dtype=dtype)
    return X, angles


def two_moons(
    n_samples: int = 2000,
    noise: float = 0.05,
    random_state: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Two interleaved half circles (the layout of ``sklearn.datasets.make_moons``).

    Angles are drawn uniformly at random, so the two moons are sampled evenly but not on a
    grid. Returns ``X`` (n_samples, 2) and integer labels (n_samples,) in {0, 1}.
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples}")
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    g = _generator(random_state)
    n0 = n_samples // 2
    t = torch.rand(n_samples, generator=g, dtype=dtype) * math.pi
    labels = (torch.arange(n_samples) >= n0).long()
    outer = torch.stack([t.cos(), t.sin()], dim=1)
    inner = torch.stack([1 - t.cos(), 0.5 - t.sin()], dim=1)
    X = torch.where(labels[:, None] == 0, outer, inner)
    X = X + noise * torch.randn(X.shape, generator=g, dtype=dtype)
    return X, labels
