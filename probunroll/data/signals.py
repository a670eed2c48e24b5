"""Planted cyclic signals: samples built from the orbit of atoms under a circular shift."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["planted_cyclic"]


def planted_cyclic(
    d: int = 16,
    n_samples: int = 1000,
    shift: int = 4,
    noise: float = 0.01,
    random_state: int | None = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Signals on a circle of length d, each one atom of the orbit {P^k a} of a base atom
    under the shift P by ``shift`` samples, times a coefficient in U[0.5, 1.5], plus noise.

    The base atom is a Gaussian (σ = 3) times cos(0.6·offset): it overlaps its shifted
    neighbours, which makes the cyclic order of the orbit identifiable.

    Returns
    -------
    X : Tensor, shape (n_samples, d)
    atoms : Tensor, shape (d // shift, d)
        The orbit atoms P^k a, k = 0 … d/shift − 1.
    P : Tensor, shape (d, d)
        The shift, (Px)_i = x_{i − shift}.
    """
    if d % shift != 0:
        raise ValueError(f"shift must divide d, got d={d}, shift={shift}")
    if n_samples < 1 or noise < 0:
        raise ValueError(f"n_samples must be positive and noise ≥ 0, got {n_samples}, {noise}")
    g = torch.Generator().manual_seed(0 if random_state is None else int(random_state))
    offset = torch.arange(d, dtype=dtype) - d // 2
    base = torch.exp(-(offset**2) / (2 * 3.0**2)) * torch.cos(0.6 * offset)
    base = base / base.norm()
    order = d // shift
    atoms = torch.stack([torch.roll(base, k * shift) for k in range(order)])
    which = torch.randint(order, (n_samples,), generator=g)
    coef = 0.5 + torch.rand(n_samples, generator=g, dtype=dtype)
    X = coef[:, None] * atoms[which] + noise * torch.randn(n_samples, d, generator=g, dtype=dtype)
    P = torch.roll(torch.eye(d, dtype=dtype), shift, dims=0)
    return X, atoms, P
