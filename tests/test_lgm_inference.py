"""The latent Gaussian interface and the inference methods: exact forms against a dense
oracle on batched, masked, cluster-broadcast problems; CoFEM against the exact posterior; the
EM loop's history and warnings; the truncated-normal moments against scipy and mpmath."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

import probunroll as pu
from probunroll.inference import cofem_posterior, exact_posterior, observed_rows, run_em
from probunroll.models.base import LinearGaussian, PosteriorMoments
from probunroll.models.truncnorm import pyro_truncated_normal, truncated_normal_moments

F64 = torch.float64


def cluster_problem(seed=0, d=24, n=24, t=5, c=3):
    """Prior (C, 1, D) against masks (T, N): batch shape (C, T), as in CMTCS."""
    g = torch.Generator().manual_seed(seed)
    phi = pu.operators.Dense(torch.randn(n, d, dtype=F64, generator=g) / n**0.5)
    alpha = torch.exp(torch.randn(c, 1, d, dtype=F64, generator=g))
    mask = (torch.rand(t, n, generator=g) < 0.6).to(F64)
    mask[:, 0] = 1
    y = torch.randn(t, n, dtype=F64, generator=g) * mask
    return LinearGaussian(alpha, phi, torch.full((1, 1, 1), 30.0, dtype=F64), y, mask)


def dense_oracle(lg):
    """μ, diag Σ and log p(y) per (c, t) with explicit inverses and scipy."""
    phi = lg.design.to_dense(dtype=F64).numpy()
    alpha = lg.prior_precision.numpy()
    beta = float(lg.noise_precision.reshape(()))
    C, T = lg.batch_shape
    mu, var, ll = np.zeros((C, T, phi.shape[1])), np.zeros((C, T, phi.shape[1])), np.zeros((C, T))
    for c in range(C):
        for t in range(T):
            obs = lg.mask[t].numpy().astype(bool)
            P, y = phi[obs], lg.target[t].numpy()[obs]
            sigma = np.linalg.inv(np.diag(alpha[c, 0]) + beta * P.T @ P)
            mu[c, t] = beta * sigma @ P.T @ y
            var[c, t] = np.diag(sigma)
            cov = np.eye(len(y)) / beta + P @ np.diag(1 / alpha[c, 0]) @ P.T
            ll[c, t] = scipy.stats.multivariate_normal(np.zeros(len(y)), cov).logpdf(y)
    return mu, var, ll


@pytest.mark.parametrize("form", ["precision", "woodbury", "auto"])
def test_exact_forms_equal_dense_oracle(form):
    lg = cluster_problem()
    post = exact_posterior(lg, form=form, rows=observed_rows(lg))
    mu, var, ll = dense_oracle(lg)
    np.testing.assert_allclose(post.mean.numpy(), mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(post.variance.numpy(), var, rtol=1e-9)
    np.testing.assert_allclose(post.loglik.numpy(), ll, rtol=1e-11)
    np.testing.assert_allclose(lg.exact_loglik().numpy(), ll, rtol=1e-11)


def test_complete_loglik_equals_scipy():
    lg = cluster_problem(1)
    z = torch.randn(3, 5, 24, dtype=F64, generator=torch.Generator().manual_seed(2))
    ours = lg.complete_loglik(z)
    phi = lg.design.to_dense(dtype=F64).numpy()
    for c in range(3):
        for t in range(5):
            obs = lg.mask[t].numpy().astype(bool)
            zc = z[c, t].numpy()
            prior = scipy.stats.norm(0, 1 / np.sqrt(lg.prior_precision[c, 0].numpy())).logpdf(zc)
            lik = scipy.stats.norm(phi[obs] @ zc, 1 / np.sqrt(30.0)).logpdf(
                lg.target[t].numpy()[obs]
            )
            np.testing.assert_allclose(float(ours[c, t]), prior.sum() + lik.sum(), rtol=1e-12)


def test_cofem_posterior_against_exact():
    lg = cluster_problem(3, d=64, n=64, t=4, c=2)
    exact = exact_posterior(lg)
    gen = torch.Generator().manual_seed(0)
    est = cofem_posterior(lg, num_probes=400, generator=gen, tol=1e-12, share_probes_over=(0,))
    torch.testing.assert_close(est.mean, exact.mean, rtol=1e-7, atol=1e-9)
    rel = ((est.variance - exact.variance) / exact.variance).abs()
    assert float(rel.median()) < 0.1
    assert float((est.loglik - exact.loglik).abs().max()) < 1.0
    assert est.cg_iterations.shape == (401, 2, 4) and bool(est.converged.all())
    # Probes shared over clusters: the solutions differ only through the operator.
    assert est.solutions.shape == (401, 2, 4, 64)


def test_cofem_warm_start_saves_iterations():
    lg = cluster_problem(4, d=64, n=64, t=4, c=2)
    gen = torch.Generator().manual_seed(0)
    cold = cofem_posterior(lg, num_probes=4, generator=gen, tol=1e-8)
    warm = cofem_posterior(lg, num_probes=4, generator=gen, tol=1e-8, warm_start=cold.mean)
    assert int(warm.cg_iterations[0].max()) < int(cold.cg_iterations[0].max())
    torch.testing.assert_close(warm.mean, cold.mean, rtol=1e-6, atol=1e-8)


def test_run_em_warns_once_when_cg_misses_tolerance():
    lg = cluster_problem(5, d=64, n=64, t=2, c=1)

    def estep(_params, _prev):
        return cofem_posterior(lg, num_probes=2, tol=1e-12, max_iters=2)

    with pytest.warns(pu.NumericalWarning, match="CG missed its tolerance in 3 of 3 E-steps"):
        _, _, history = run_em(estep, lambda p, s, i: p, None, 3, progress=False)
    assert [h["converged"] for h in history] == [False] * 3
    assert all(h["cg_iterations"] == 2 for h in history)


def test_run_em_history_without_cg():
    moments = PosteriorMoments(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([1.0, 2.0]))
    _, _, history = run_em(lambda p, s: moments, lambda p, s, i: p, None, 2, progress=False)
    assert [h["loglik"] for h in history] == [3.0, 3.0]
    assert all(h["converged"] for h in history)
    assert history[1]["seconds"] >= history[0]["seconds"] >= 0


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_truncated_normal_moments_against_scipy(dtype):
    a = np.linspace(-8, 8, 161)
    s = 0.49
    mean = torch.tensor(a * np.sqrt(s), dtype=dtype)
    tmean, tvar = truncated_normal_moments(mean, torch.full_like(mean, s))
    assert tmean.dtype == dtype
    ref = scipy.stats.truncnorm(-a, np.inf, loc=a * np.sqrt(s), scale=np.sqrt(s))
    rtol = 1e-10 if dtype == F64 else 1e-6
    np.testing.assert_allclose(tmean.double().numpy(), ref.mean(), rtol=rtol)
    np.testing.assert_allclose(tvar.double().numpy(), ref.var(), rtol=rtol)


def test_truncated_normal_far_tail_against_mpmath():
    """Beyond a = −20 the closed form cancels; the series must stay accurate (scipy itself
    drifts there, so the oracle is 60-digit mpmath)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    for a in (-21.0, -30.0, -60.0, -200.0):
        h = mpmath.mpf(-a)
        mills = mpmath.npdf(h) / (mpmath.erfc(h / mpmath.sqrt(2)) / 2)
        shift = mills - h
        var = 1 + h * h - h * mills - shift**2
        tmean, tvar = truncated_normal_moments(
            torch.tensor(a, dtype=F64), torch.tensor(1.0, dtype=F64)
        )
        assert abs(float(tmean) / float(shift) - 1) < 1e-8
        assert abs(float(tvar) / float(var) - 1) < 1e-7


def test_pyro_truncated_normal_log_prob_and_samples():
    pytest.importorskip("pyro")
    loc, scale = torch.tensor([0.3, -1.0], dtype=F64), torch.tensor([0.7, 0.5], dtype=F64)
    d = pyro_truncated_normal(loc, scale)
    x = torch.tensor([[0.2, 0.1], [1.5, 0.0], [-0.1, 2.0]], dtype=F64)
    ref = scipy.stats.truncnorm(-loc / scale, np.inf, loc=loc, scale=scale).logpdf(x.numpy())
    np.testing.assert_allclose(d.log_prob(x).numpy(), ref, rtol=1e-12)
    torch.manual_seed(0)
    samples = d.sample((20000,))
    assert bool((samples >= 0).all())
    tmean, _ = truncated_normal_moments(loc, scale**2)
    assert float((samples.mean(0) - tmean).abs().max()) < 0.02
    assert math.isinf(float(d.log_prob(torch.tensor([-0.5, 1.0], dtype=F64))[0]))
