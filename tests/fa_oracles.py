"""Independent dense oracles for factor analysis with missing data (test helpers)."""

from __future__ import annotations

import math

import numpy as np
import torch


def dense_marginal_loglik(params: dict, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log N(ỹ_obs; m_obs, (WWᵀ + Ψ⁻¹)_obs)`` per point by a dense N×N Gaussian.

    Missing coordinates get an independent N(0, 1) at 0, whose density is then removed, so
    all points share one batched ``MultivariateNormal``. Differentiable in ``params``.
    """
    W, m, psi = params["W"], params["mean"], params["log_psi"].exp()
    cov = W @ W.T + torch.diag(1.0 / psi)
    outer = mask.unsqueeze(-1) * mask.unsqueeze(-2)
    eye = torch.eye(W.shape[0], dtype=W.dtype)
    cov_n = outer * cov + torch.diag_embed(1.0 - mask) * eye
    dist = torch.distributions.MultivariateNormal(mask * m, covariance_matrix=cov_n)
    return dist.log_prob(y) + 0.5 * (1.0 - mask).sum(-1) * math.log(2.0 * math.pi)


def synthetic_fa(n, N, D, missing, seed, noise=(0.2, 1.0)):
    """Synthetic FA data: returns (Y with NaN, W, mean, noise variances)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(N, D))
    mean = rng.normal(size=N)
    var = rng.uniform(*noise, size=N)
    Y = rng.normal(size=(n, D)) @ W.T + mean + rng.normal(size=(n, N)) * np.sqrt(var)
    Y[rng.random(Y.shape) < missing] = np.nan
    empty = np.isnan(Y).all(1)
    Y[empty, 0] = mean[0]
    return Y, W, mean, var


def random_params(N, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "W": torch.randn(N, D, generator=g, dtype=dtype),
        "mean": torch.randn(N, generator=g, dtype=dtype),
        "log_psi": 0.5 * torch.randn(N, generator=g, dtype=dtype),
    }


def random_batch(B, N, missing, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, N, generator=g) > missing).to(dtype)
    mask[:, 0] = 1.0
    y = torch.randn(B, N, generator=g, dtype=dtype) * 2.0 * mask
    return y, mask
