"""Sparse Bayesian dictionary learning: the model interface, and gradient EM / unrolled fits
that recover a planted dictionary (issue 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probunroll.inference.gradient_em import fisher_objective
from probunroll.inference.unrolled import UnrolledConfig, unrolled_objective
from probunroll.models.sbl_dictionary import (
    SBLDictionaryModel,
    SparseBayesianDictionaryLearning,
    atom_recovery,
    planted_dictionary,
)


def _problem(seed: int = 0, B: int = 5, N: int = 6, D: int = 9):
    g = torch.Generator().manual_seed(seed)
    params = {
        "V": torch.randn(N, D, generator=g, dtype=torch.float64),
        "log_beta": torch.tensor(1.5, dtype=torch.float64),
    }
    log_alpha = torch.randn(B + 3, D, generator=g, dtype=torch.float64)
    y = torch.randn(B, N, generator=g, dtype=torch.float64)
    index = torch.arange(2, B + 2)
    return SBLDictionaryModel(log_alpha), params, (y, index)


def _closed_form(model, params, batch) -> torch.Tensor:
    """log N(y_t; 0, Φ diag(α_t)⁻¹ Φᵀ + β⁻¹ I), differentiable in θ."""
    Phi = params["V"] / params["V"].norm(dim=0)
    alpha = model.log_alpha[batch[1]].exp()
    N = Phi.shape[0]
    cov = (Phi / alpha.unsqueeze(-2)) @ Phi.T + torch.eye(N, dtype=Phi.dtype) / params[
        "log_beta"
    ].exp()
    dist = torch.distributions.MultivariateNormal(torch.zeros(N, dtype=Phi.dtype), cov)
    return dist.log_prob(batch[0])


def test_exact_loglik_and_fisher_gradient_match_the_closed_form():
    model, params, batch = _problem()
    torch.testing.assert_close(
        model.exact_loglik(params, batch), _closed_form(model, params, batch)
    )
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = torch.autograd.grad(_closed_form(model, leaves, batch).mean(), list(leaves.values()))
    alpha_before = model.log_alpha.clone()
    value, _ = fisher_objective(model, leaves, batch)
    got = torch.autograd.grad(value, list(leaves.values()))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    # the local EM step touched only the batch's rows: α ← 1/(μ² + diag Σ)
    untouched = torch.ones(len(alpha_before), dtype=torch.bool)
    untouched[batch[1]] = False
    torch.testing.assert_close(model.log_alpha[untouched], alpha_before[untouched])
    assert not torch.allclose(model.log_alpha[batch[1]], alpha_before[batch[1]])


def test_unrolled_gradient_with_exact_solves_is_unbiased():
    """With converged CG and many samples the unrolled gradient matches the exact one, and its
    α step matches gradient EM's within the Monte Carlo error of diag Σ."""
    model, params, batch = _problem(seed=1)
    start = model.log_alpha.clone()
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = torch.autograd.grad(_closed_form(model, leaves, batch).mean(), list(leaves.values()))
    exact_alpha = None
    fisher_objective(model, leaves, batch)
    exact_alpha = model.log_alpha[batch[1]].clone()
    grads = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        model.log_alpha = start.clone()
        value, _ = unrolled_objective(model, leaves, batch, gen, UnrolledConfig(200, 40))
        grads.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, leaves.values())])
        )
    G = torch.stack(grads)
    mean, se = G.mean(0), G.std(0) / math.sqrt(len(G))
    flat_ref = torch.cat([g.reshape(-1) for g in ref])
    assert bool(((mean - flat_ref).abs() <= 4 * se + 1e-9).all())
    # K=200 samples: diag Σ to ~10%, so log α to ~0.1 (μ² shrinks the error further)
    assert float((model.log_alpha[batch[1]] - exact_alpha).abs().max()) < 0.5


def test_estimator_validates_and_raises_the_likelihood():
    Y, _, _ = planted_dictionary(300, 8, 10, 2, noise=0.02, seed=3)
    with pytest.raises(ValueError, match="method"):
        SparseBayesianDictionaryLearning(10, method="em").fit(Y)
    with pytest.raises(ValueError, match="n_atoms"):
        SparseBayesianDictionaryLearning(0).fit(Y)
    with pytest.raises(ValueError, match="not fitted"):
        SparseBayesianDictionaryLearning(10).score()
    est = SparseBayesianDictionaryLearning(
        10, "unrolled", max_iter=8, batch_size=50, lr=0.03, random_state=0, progress=False
    ).fit(Y)
    assert est.components_.shape == (10, 8)
    torch.testing.assert_close(est.components_.norm(dim=1), torch.ones(10, dtype=torch.float64))
    ll = [h["loglik"] for h in est.history_]
    assert ll[-1] > ll[0] + 1.0, ll
    assert np.isfinite(est.score())


@pytest.mark.slow
def test_gradient_em_and_unrolled_recover_a_planted_dictionary():
    """N=16, D=24 atoms (1.5× overcomplete), 3 non-zeros per signal, T=1500, noise 0.02:
    both methods find ≥ 90% of the atoms with |cos| > 0.9 and reach the same exact
    log-likelihood within 1%."""
    Y, Phi, _ = planted_dictionary(1500, 16, 24, 3, noise=0.02, seed=0)
    fits = {
        m: SparseBayesianDictionaryLearning(
            24,
            m,
            max_iter=30,
            batch_size=100,
            lr=0.01,
            num_samples=10,
            unroll_steps=20,
            random_state=0,
            progress=False,
        ).fit(Y)
        for m in ("gradient_em", "unrolled")
    }
    for est in fits.values():
        assert atom_recovery(est.components_.T, Phi) >= 0.9
    g, u = fits["gradient_em"].score(), fits["unrolled"].score()
    assert abs(g - u) <= 0.01 * abs(g), (g, u)
