"""Synthetic problems with known ground truth (seeded by ``random_state``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from probunroll.operators import DCT, Dense


@dataclass(frozen=True)
class SparseSignalProblem:
    """A compressed-sensing problem ``y = Ω(Φ x + σ ε)``.

    Attributes
    ----------
    Phi : operator, shape (N, D)
    y : Tensor, shape (N,) or (T, N)
        Measurements, zero where not observed.
    x : Tensor, shape (D,) or (T, D)
        The sparse ground truth.
    mask : Tensor or None, shape of ``y``
        Observed entries (``None``: all observed).
    noise_std : float
    """

    Phi: Any
    y: Tensor
    x: Tensor
    mask: Tensor | None
    noise_std: float


def make_sparse_signal(
    n_features: int,
    n_measurements: int,
    n_nonzero: int,
    *,
    noise_std: float = 0.01,
    operator: str = "dct",
    n_vectors: int | None = None,
    shared_support: bool = False,
    nonnegative: bool = False,
    random_state: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> SparseSignalProblem:
    """A sparse signal and its noisy compressed measurements (the CoFEM demo setting).

    ``x`` has ``n_nonzero`` standard normal entries (``|·|`` when ``nonnegative``) on a random
    support. With ``operator="dct"``, ``Φ`` is the orthonormal ``D``-point DCT and a random
    ``mask`` keeps ``n_measurements`` of its outputs (a subsampled DCT); with
    ``operator="gaussian"``, ``Φ`` is a dense ``N × D`` matrix with ``N(0, 1/N)`` entries and no
    mask. ``n_vectors`` gives ``T`` vectors, on one common support if ``shared_support``.
    """
    if operator not in ("dct", "gaussian"):
        raise ValueError(f"operator must be 'dct' or 'gaussian', got {operator!r}")
    if not 0 < n_nonzero <= n_features or not 0 < n_measurements <= n_features:
        raise ValueError("need 0 < n_nonzero <= n_features and 0 < n_measurements <= n_features")
    rng = np.random.default_rng(random_state)
    d, n = n_features, n_measurements
    t = 1 if n_vectors is None else n_vectors
    x = np.zeros((t, d))
    common = rng.choice(d, n_nonzero, replace=False)
    for i in range(t):
        support = common if shared_support else rng.choice(d, n_nonzero, replace=False)
        values = rng.standard_normal(n_nonzero)
        x[i, support] = np.abs(values) if nonnegative else values
    x_t = torch.tensor(x, dtype=dtype)
    if operator == "dct":
        phi = DCT(d)
        mask = np.zeros((t, d))
        for i in range(t):
            mask[i, rng.choice(d, n, replace=False)] = 1.0
        mask_t = torch.tensor(mask, dtype=dtype)
        noise = noise_std * rng.standard_normal((t, d))
        y = mask_t * (phi(x_t) + torch.tensor(noise, dtype=dtype))
    else:
        phi = Dense(torch.tensor(rng.standard_normal((n, d)) / np.sqrt(n), dtype=dtype))
        mask_t = None
        y = phi(x_t) + torch.tensor(noise_std * rng.standard_normal((t, n)), dtype=dtype)
    if n_vectors is None:
        x_t, y = x_t[0], y[0]
        mask_t = None if mask_t is None else mask_t[0]
    return SparseSignalProblem(Phi=phi, y=y, x=x_t, mask=mask_t, noise_std=noise_std)


@dataclass(frozen=True)
class MultiTaskProblem:
    """A clustered multi-task compressive-sensing problem.

    Attributes
    ----------
    Phi : operator, shape (D, D)
        The shared sensing operator (orthonormal DCT).
    Y : Tensor, shape (T, D)
        Measurements, zero where not observed.
    X : Tensor, shape (T, D)
        Ground-truth signals; tasks of one cluster share a support.
    masks : Tensor, shape (T, D)
        Observed entries per task.
    labels : Tensor, shape (T,)
        True cluster of each task.
    noise_std : float
    """

    Phi: Any
    Y: Tensor
    X: Tensor
    masks: Tensor
    labels: Tensor
    noise_std: float


def make_cmtcs_problem(
    n_features: int = 256,
    n_tasks: int = 20,
    n_clusters: int = 2,
    *,
    observed_fraction: float = 0.25,
    support_fraction: float = 0.05,
    noise_std: float = 0.05,
    random_state: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> MultiTaskProblem:
    """Tasks in ``n_clusters`` clusters; each cluster has a random support of
    ``support_fraction · D`` coefficients, each task standard normal values on its cluster's
    support and its own random mask keeping ``observed_fraction`` of the DCT outputs (the
    multics benchmark setting, with a real DCT). Clusters are balanced (task ``t`` in cluster
    ``t mod C`` before a random permutation)."""
    if not 0 < observed_fraction <= 1 or not 0 < support_fraction <= 1:
        raise ValueError("observed_fraction and support_fraction must lie in (0, 1]")
    if n_clusters < 1 or n_tasks < n_clusters:
        raise ValueError("need 1 <= n_clusters <= n_tasks")
    rng = np.random.default_rng(random_state)
    d = n_features
    k = max(1, round(support_fraction * d))
    m = max(1, round(observed_fraction * d))
    supports = [rng.choice(d, k, replace=False) for _ in range(n_clusters)]
    labels = rng.permutation(np.arange(n_tasks) % n_clusters)
    x = np.zeros((n_tasks, d))
    masks = np.zeros((n_tasks, d))
    for t in range(n_tasks):
        x[t, supports[labels[t]]] = rng.standard_normal(k)
        masks[t, rng.choice(d, m, replace=False)] = 1.0
    phi = DCT(d)
    x_t = torch.tensor(x, dtype=dtype)
    masks_t = torch.tensor(masks, dtype=dtype)
    noise = torch.tensor(noise_std * rng.standard_normal((n_tasks, d)), dtype=dtype)
    y = masks_t * (phi(x_t) + noise)
    return MultiTaskProblem(
        Phi=phi, Y=y, X=x_t, masks=masks_t, labels=torch.tensor(labels), noise_std=noise_std
    )
