"""Clustered multi-task compressive sensing: the issue's reference case, exact EM against a
dense mixture-EM reference, common probes, learned weights, pyro, bad input."""

import numpy as np
import pytest
import scipy.stats
import torch

import probunroll as pu
from probunroll.data.synthetic import make_cmtcs_problem
from probunroll.inference import cofem_posterior, exact_posterior
from probunroll.models.cmtcs import CMTCSModel, CMTCSParams, cluster_accuracy
from probunroll.models.sbl import SBLBatch

F64 = torch.float64


def nmse(est, truth):
    return float(((est - truth) ** 2).sum() / (truth**2).sum())


@pytest.fixture(scope="module")
def reference_case():
    """Issue 3, must-show 3: D=256, T=20, C=2, 25% observed DCT, 5% support, σ=0.05."""
    prob = make_cmtcs_problem(256, 20, 2, random_state=0)
    fits = {}
    for method, mode in (("em", "clustered"), ("cofem", "clustered"), ("em", "separate")):
        fits[method, mode] = pu.ClusteredMultiTaskCS(
            2,
            method,
            mode=mode,
            max_iter=30,
            noise_precision=400.0,
            random_state=0,
            progress=False,
        ).fit(prob.Phi, prob.Y, masks=prob.masks)
    return prob, fits


def test_em_and_cofem_cluster_and_reconstruct(reference_case):
    prob, fits = reference_case
    em, cofem = fits["em", "clustered"], fits["cofem", "clustered"]
    assert cluster_accuracy(em.labels_, prob.labels) >= 0.95
    assert cluster_accuracy(cofem.labels_, prob.labels) >= 0.95
    assert abs(nmse(em.coef_, prob.X) - nmse(cofem.coef_, prob.X)) < 0.01
    assert nmse(em.coef_, prob.X) < 0.05
    assert all(h["converged"] for h in cofem.history_)
    torch.testing.assert_close(em.responsibilities_.sum(1), torch.ones(20, dtype=F64))
    assert em.alpha_.shape == (2, 256) and em.weights_.shape == (2,)
    assert em.mixture_coef_.shape == (20, 256)


def test_clustered_beats_separate(reference_case):
    prob, fits = reference_case
    assert nmse(fits["em", "clustered"].coef_, prob.X) < 0.7 * nmse(
        fits["em", "separate"].coef_, prob.X
    )
    sep = fits["em", "separate"]
    assert sep.alpha_.shape == (20, 256)
    torch.testing.assert_close(sep.labels_, torch.arange(20))


def test_em_loglik_never_decreases(reference_case):
    _, fits = reference_case
    ll = np.array([h["loglik"] for h in fits["em", "clustered"].history_])
    assert np.all(np.diff(ll) >= -1e-8 * np.abs(ll[1:]))


def test_shared_probes_make_loglik_differences_far_less_noisy():
    """At initialisation-like profiles, Δℓ_t = ℓ_1t − ℓ_2t from SLQ over 20 probe draws:
    common probes across clusters cut its spread several-fold against independent probes."""
    prob = make_cmtcs_problem(256, 6, 2, random_state=1)
    gen = torch.Generator().manual_seed(0)
    alpha = torch.exp(0.3 * torch.randn(2, 1, 256, dtype=F64, generator=gen))
    model = CMTCSModel(prob.Phi)
    params = CMTCSParams(alpha, torch.full((1, 1, 1), 400.0, dtype=F64), torch.zeros(2))
    lg = model.linear_gaussian(params, SBLBatch(prob.Y, prob.masks))
    exact = exact_posterior(lg).loglik
    exact_diff = exact[0] - exact[1]
    spreads = {}
    for share in ((0,), ()):
        diffs = []
        for _ in range(20):
            ll = cofem_posterior(lg, num_probes=15, generator=gen, share_probes_over=share).loglik
            diffs.append(ll[0] - ll[1])
        diffs = torch.stack(diffs)
        spreads[share] = float(diffs.std(0).mean())
        assert float((diffs.mean(0) - exact_diff).abs().max()) < 5 * spreads[share] / 20**0.5 + 0.1
    assert spreads[(0,)] < 0.3 * spreads[()]


def reference_mixture_em(phi, Y, masks, beta, first_resp, iters):
    """Mixture-of-SBL EM in numpy with explicit inverses and scipy log-densities (an oracle)."""
    C, T = first_resp.shape
    D = phi.shape[1]
    alpha = np.ones((C, D))
    log_pi = np.log(np.full(C, 1.0 / C))
    for it in range(iters + 1):
        mu = np.zeros((C, T, D))
        var = np.zeros((C, T, D))
        ll = np.zeros((C, T))
        for c in range(C):
            for t in range(T):
                obs = masks[t].astype(bool)
                P, y = phi[obs], Y[t, obs]
                sigma = np.linalg.inv(np.diag(alpha[c]) + beta * P.T @ P)
                mu[c, t] = beta * sigma @ P.T @ y
                var[c, t] = np.diag(sigma)
                cov = np.eye(len(y)) / beta + P @ np.diag(1 / alpha[c]) @ P.T
                ll[c, t] = scipy.stats.multivariate_normal(np.zeros(len(y)), cov).logpdf(y)
        if it == iters:
            return mu, alpha, np.exp(log_pi), ll
        a = log_pi[:, None] + ll
        resp = np.exp(a - a.max(0)) / np.exp(a - a.max(0)).sum(0)
        if it == 0:
            resp = first_resp
        second = mu**2 + var
        alpha = resp.sum(1)[:, None] / (resp[..., None] * second).sum(1)
        log_pi = np.log(resp.mean(1))


@pytest.mark.parametrize("form", ["precision", "woodbury"])
def test_exact_em_equals_dense_mixture_reference(form):
    """Both exact E-steps (the D×D precision of benchmark (a), the Woodbury form of (b)) give
    the same fit as the oracle, so the benchmark's accuracies and NMSEs of (a) and (b) agree."""
    prob = make_cmtcs_problem(24, 6, 2, observed_fraction=0.5, support_fraction=0.2, random_state=2)
    est = pu.ClusteredMultiTaskCS(
        2, "em", max_iter=6, noise_precision=100.0, em_form=form, random_state=3, progress=False
    ).fit(prob.Phi, prob.Y, masks=prob.masks)
    # The estimator's first-M-step responsibilities, redrawn from the same seed.
    u = torch.rand((2, 6), generator=torch.Generator().manual_seed(3)).to(F64)
    e = -torch.log(u)
    first = (e / e.sum(0)).numpy()
    phi = prob.Phi.to_dense(dtype=F64).numpy()
    mu, alpha, pi, ll = reference_mixture_em(
        phi, prob.Y.numpy(), prob.masks.numpy(), 100.0, first, 6
    )
    np.testing.assert_allclose(est.alpha_.numpy(), alpha, rtol=1e-8)
    np.testing.assert_allclose(est.weights_.numpy(), pi, rtol=1e-9)
    mix = est.mixture_coef_.numpy()
    a = np.log(pi)[:, None] + ll
    resp = np.exp(a - a.max(0)) / np.exp(a - a.max(0)).sum(0)
    np.testing.assert_allclose(mix, (resp[..., None] * mu).sum(0), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(float(est.loglik_), np.logaddexp.reduce(a, axis=0).sum(), rtol=1e-10)


def test_mixing_weights_are_learned():
    prob = make_cmtcs_problem(128, 16, 2, observed_fraction=0.4, random_state=4)
    keep = torch.cat(
        [torch.nonzero(prob.labels == 0).flatten(), torch.nonzero(prob.labels == 1).flatten()[:3]]
    )
    est = pu.ClusteredMultiTaskCS(
        2, "em", max_iter=30, noise_precision=400.0, random_state=0, progress=False
    )
    est.fit(prob.Phi, prob.Y[keep], masks=prob.masks[keep])
    assert cluster_accuracy(est.labels_, prob.labels[keep]) == 1.0
    np.testing.assert_allclose(sorted(est.weights_.tolist()), [3 / 11, 8 / 11], atol=0.02)


def test_tol_stops_em_when_the_means_settle():
    prob = make_cmtcs_problem(64, 8, 2, observed_fraction=0.5, random_state=6)
    kw = dict(noise_precision=400.0, random_state=0, progress=False)
    stopped = pu.ClusteredMultiTaskCS(2, "em", max_iter=300, tol=3e-3, **kw)
    stopped.fit(prob.Phi, prob.Y, masks=prob.masks)
    assert 1 < stopped.n_iter_ < 300
    changes = [row["mean_change"] for row in stopped.history_]
    assert changes[-1] <= 3e-3 < min(changes[:-1])
    fixed = pu.ClusteredMultiTaskCS(2, "em", max_iter=stopped.n_iter_, **kw)
    fixed.fit(prob.Phi, prob.Y, masks=prob.masks)
    torch.testing.assert_close(stopped.mixture_coef_, fixed.mixture_coef_, rtol=0, atol=0)


def test_float32_and_float64_agree():
    prob = make_cmtcs_problem(128, 10, 2, observed_fraction=0.4, random_state=5)
    errors = {}
    for dtype in (torch.float32, F64):
        est = pu.ClusteredMultiTaskCS(
            2,
            "cofem",
            max_iter=20,
            noise_precision=400.0,
            random_state=0,
            dtype=dtype,
            progress=False,
        )
        est.fit(prob.Phi, prob.Y, masks=prob.masks)
        assert est.coef_.dtype == dtype
        errors[dtype] = nmse(est.coef_.double(), prob.X)
    assert abs(errors[torch.float32] - errors[F64]) < 0.005


@pytest.mark.parametrize("mode", ["clustered", "joint"])
def test_to_pyro_log_joint_equals_ours(mode):
    pyro = pytest.importorskip("pyro")
    from pyro import poutine

    prob = make_cmtcs_problem(32, 6, 2, observed_fraction=0.5, random_state=6)
    est = pu.ClusteredMultiTaskCS(
        2, "em", mode=mode, max_iter=4, random_state=0, progress=False
    ).fit(prob.Phi, prob.Y, masks=prob.masks)
    model_fn, guide_fn = est.to_pyro()
    z = est.coef_ + 0.05
    labels = torch.tensor([0, 1, 1, 0, 1, 0]) if mode == "clustered" else torch.zeros(6).long()
    data = {"x": z, "label": labels} if mode == "clustered" else {"x": z}
    trace = poutine.trace(poutine.condition(model_fn, data=data)).get_trace(prob.Y, prob.masks)
    ours = est.model_.complete_loglik(est._params, est._batch, z, labels=labels).sum()
    assert abs(float(trace.log_prob_sum()) - float(ours)) < 1e-10 * abs(float(ours))
    guide_trace = poutine.trace(guide_fn).get_trace(prob.Y, prob.masks)
    assert guide_trace.nodes["x"]["value"].shape == (6, 32)
    pyro.clear_param_store()


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("nan_phi", "Phi contains NaN"),
        ("nan_y", "Y contains NaN or Inf at observed"),
        ("masks_shape", "masks has shape"),
        ("all_missing", "masks has rows with no observed entry: \\[2\\]"),
        ("noise", "noise_precision must be a positive"),
        ("clusters", "n_clusters=30 exceeds the number of tasks 8"),
        ("mode", "mode must be one of"),
        ("y_1d", "Y must have 2 dimensions"),
        ("phi_rows", "Y has 16 entries per vector but the operator has 15 rows"),
        ("tol", "tol must be a positive"),
    ],
)
def test_bad_input_raises_and_leaves_inputs_untouched(case, match):
    rng = np.random.default_rng(7)
    phi = rng.standard_normal((16, 16))
    Y = rng.standard_normal((8, 16))
    masks = (rng.random((8, 16)) < 0.5).astype(float)
    masks[:, 0] = 1
    kwargs = {"progress": False}
    if case == "nan_phi":
        phi[0, 0] = np.inf
    elif case == "nan_y":
        Y[1, 0] = np.nan
    elif case == "masks_shape":
        masks = masks[:, :8]
    elif case == "all_missing":
        masks[2] = 0
    elif case == "noise":
        kwargs["noise_precision"] = -3.0
    elif case == "clusters":
        kwargs["n_clusters"] = 30
    elif case == "mode":
        kwargs["mode"] = "hierarchical"
    elif case == "y_1d":
        Y, masks = Y[0], masks[0]
    elif case == "phi_rows":
        phi = phi[:15]
    elif case == "tol":
        kwargs["tol"] = float("nan")
    copies = [a.copy() for a in (phi, Y, masks)]
    with pytest.raises(ValueError, match=match):
        pu.ClusteredMultiTaskCS(**kwargs).fit(phi, Y, masks=masks)
    for before, after in zip(copies, (phi, Y, masks), strict=True):
        np.testing.assert_array_equal(before, after)


def _dense_mixture_predictive(phi, phi_new, Y, masks, alpha, beta, resp):
    """Mixture predictive mean and variance from explicit per-(cluster, task) inverses (an
    oracle); ``alpha`` (C, T, D) per pair, ``resp`` (C, T)."""
    C, T = resp.shape
    mean = np.zeros((T, phi_new.shape[0]))
    second = np.zeros_like(mean)
    for t in range(T):
        obs = masks[t].astype(bool)
        P, y = phi[obs], Y[t, obs]
        for c in range(C):
            sigma = np.linalg.inv(np.diag(alpha[c, t]) + beta * P.T @ P)
            mu = beta * sigma @ P.T @ y
            m = phi_new @ mu
            q = np.einsum("md,de,me->m", phi_new, sigma, phi_new)
            mean[t] += resp[c, t] * m
            second[t] += resp[c, t] * (q + m**2)
    return mean, second - mean**2 + 1.0 / beta


@pytest.mark.parametrize(
    ("method", "form", "mode"),
    [
        ("em", "precision", "clustered"),
        ("em", "woodbury", "clustered"),
        ("cofem", "auto", "clustered"),
        ("em", "auto", "separate"),
    ],
)
def test_predict_equals_dense_mixture_predictive(method, form, mode):
    prob = make_cmtcs_problem(32, 6, 2, observed_fraction=0.5, random_state=1)
    est = pu.ClusteredMultiTaskCS(
        2,
        method,
        mode=mode,
        em_form=form,
        max_iter=15,
        cg_tol=1e-11,
        random_state=0,
        progress=False,
    ).fit(prob.Phi, prob.Y, masks=prob.masks)
    phi = pu.operators.as_operator(prob.Phi, dtype=F64).to_dense().numpy()
    rng = np.random.default_rng(2)
    phi_new = rng.standard_normal((5, 32)) / np.sqrt(32)
    Y, masks = np.asarray(prob.Y) * np.asarray(prob.masks), np.asarray(prob.masks)
    beta = float(est.noise_precision_)
    if mode == "separate":
        alpha, resp = est.alpha_.numpy()[None], np.ones((1, 6))
    else:
        alpha = np.repeat(est.alpha_.numpy()[:, None], 6, axis=1)
        resp = est.responsibilities_.numpy().T
    want_mean, want_var = _dense_mixture_predictive(phi, phi_new, Y, masks, alpha, beta, resp)
    mean, std = est.predict(phi_new, return_std=True)
    assert mean.shape == std.shape == (6, 5)
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(std.numpy() ** 2, want_var, rtol=1e-8)
    torch.testing.assert_close(mean, est.mixture_coef_ @ torch.from_numpy(phi_new).T)
    assert est.predict().shape == (6, 32)


def test_predict_bad_input():
    prob = make_cmtcs_problem(16, 4, 2, observed_fraction=0.5, random_state=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        pu.ClusteredMultiTaskCS(2).predict()
    est = pu.ClusteredMultiTaskCS(2, "em", max_iter=3, progress=False)
    est.fit(prob.Phi, prob.Y, masks=prob.masks)
    with pytest.raises(ValueError, match="columns"):
        est.predict(np.ones((3, 15)))
