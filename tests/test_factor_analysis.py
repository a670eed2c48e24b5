"""Factor analysis with missing data: the model interface and exact EM (issue 3, point 4)."""

import numpy as np
import pytest
import torch
from fa_oracles import dense_marginal_loglik, random_batch, random_params, synthetic_fa

import probunroll as pu
from probunroll.inference.gradient_em import dense_posterior, fisher_objective
from probunroll.models.factor_analysis import FactorAnalysisModel


@pytest.mark.parametrize(("N", "D"), [(12, 4), (6, 9)])
def test_exact_loglik_matches_dense_gaussian(N, D):
    params = random_params(N, D, seed=0)
    batch = random_batch(40, N, 0.3, seed=1)
    ref = dense_marginal_loglik(params, *batch)
    for form in ("direct", "woodbury"):
        ours = FactorAnalysisModel(D, posterior_form=form).exact_loglik(params, batch)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(("N", "D"), [(12, 4), (6, 9)])
def test_posterior_forms_and_generic_dense_posterior_agree(N, D):
    params = random_params(N, D, seed=2)
    batch = random_batch(30, N, 0.4, seed=3)
    direct = FactorAnalysisModel(D, "direct").exact_posterior(params, batch)
    wood = FactorAnalysisModel(D, "woodbury").exact_posterior(params, batch)
    generic = dense_posterior(FactorAnalysisModel(D), params, batch)
    for other in (wood.mean, generic.mean):
        torch.testing.assert_close(other, direct.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(wood.logdet, direct.logdet, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(wood.covariance(), direct.cov, rtol=1e-10, atol=1e-10)
    sqrt = generic.sqrt_cov
    torch.testing.assert_close(sqrt @ sqrt.mT, direct.cov, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["direct", "woodbury"])
def test_fisher_gradient_equals_autograd_of_dense_loglik(form):
    """Fisher identity: ∇Q at the current posterior = ∇ log p(ỹ) (dense, independent oracle)."""
    N, D = 10, 4
    params = {k: v.requires_grad_(True) for k, v in random_params(N, D, seed=4).items()}
    batch = random_batch(25, N, 0.3, seed=5)
    ref = torch.autograd.grad(dense_marginal_loglik(params, *batch).mean(), list(params.values()))
    value, _ = fisher_objective(FactorAnalysisModel(D, form), params, batch)
    ours = torch.autograd.grad(value, list(params.values()))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_fisher_gradient_takes_the_dense_e_step_when_exact_posterior_is_not_callable():
    """A model whose ``exact_posterior`` attribute is switched off (None) is not taken for one
    that forms its own posterior: the generic dense E-step runs and the gradient is exact."""

    class NoOwnPosterior(FactorAnalysisModel):
        exact_posterior = None

    N, D = 8, 3
    params = {k: v.requires_grad_(True) for k, v in random_params(N, D, seed=6).items()}
    batch = random_batch(20, N, 0.3, seed=7)
    ref = torch.autograd.grad(dense_marginal_loglik(params, *batch).mean(), list(params.values()))
    value, _ = fisher_objective(NoOwnPosterior(D), params, batch)
    ours = torch.autograd.grad(value, list(params.values()))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_em_without_missing_matches_sklearn():
    from sklearn.decomposition import FactorAnalysis as SkFA

    Y, *_ = synthetic_fa(500, 10, 3, missing=0.0, seed=0)
    ours = pu.FactorAnalysis(3, max_iter=2000, tol=1e-10).fit(Y)
    ref = SkFA(3, tol=1e-10, max_iter=10000).fit(Y)
    assert abs(ours.score(Y) - ref.score(Y)) <= 1e-3 * abs(ref.score(Y))
    np.testing.assert_allclose(ours.score_samples(Y).numpy(), ref.score_samples(Y), rtol=1e-3)
    np.testing.assert_allclose(
        ours.get_covariance().numpy(), ref.get_covariance(), rtol=1e-2, atol=1e-2
    )


def test_em_with_missing_is_monotone_and_recovers_covariance():
    Y, W, mean, var = synthetic_fa(2000, 20, 5, missing=0.3, seed=1)
    fa = pu.FactorAnalysis(5, init="random", random_state=0, max_iter=300).fit(Y)
    ll = np.array([h["loglik"] for h in fa.history_])
    assert len(ll) > 20
    assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[1:]))
    true = W @ W.T + np.diag(var)
    err = np.linalg.norm(fa.get_covariance().numpy() - true) / np.linalg.norm(true)
    # statistical floor: the sample covariance of the same points without missing entries
    complete, *_ = synthetic_fa(2000, 20, 5, missing=0.0, seed=1)
    floor = np.linalg.norm(np.cov(complete.T) - true) / np.linalg.norm(true)
    assert err < 0.1 and err < 1.3 * floor
    np.testing.assert_allclose(fa.mean_.numpy(), mean, atol=0.15)
    for key in ("iteration", "seconds", "loglik", "converged"):
        assert key in fa.history_[-1]


def test_transform_score_and_float32():
    Y, *_ = synthetic_fa(300, 8, 2, missing=0.2, seed=2)
    fa = pu.FactorAnalysis(2, max_iter=100).fit(Y)
    Z = fa.transform(Y)
    assert Z.shape == (300, 2) and Z.dtype == torch.float64
    assert np.isclose(fa.score(Y), float(fa.score_samples(Y).mean()))
    fa32 = pu.FactorAnalysis(2, max_iter=100, dtype=torch.float32).fit(Y)
    assert fa32.components_.dtype == torch.float32
    assert abs(fa32.score(Y) - fa.score(Y)) < 1e-3 * abs(fa.score(Y))


def test_to_pyro_log_joint_matches_ours():
    pyro = pytest.importorskip("pyro")
    from pyro import poutine

    Y, *_ = synthetic_fa(50, 7, 3, missing=0.3, seed=3)
    fa = pu.FactorAnalysis(3, max_iter=30).fit(Y)
    model_fn, guide_fn = fa.to_pyro()
    pyro.set_rng_seed(0)
    guide = poutine.trace(guide_fn).get_trace(Y)
    z = guide.nodes["z"]["value"]
    model = poutine.trace(poutine.replay(model_fn, trace=guide)).get_trace(Y)
    y0 = torch.as_tensor(np.nan_to_num(Y))
    mask = torch.as_tensor(~np.isnan(Y), dtype=torch.float64)
    ours = FactorAnalysisModel(3).complete_loglik(fa.params_, (y0, mask), z).sum()
    assert abs(float(model.log_prob_sum()) - float(ours)) <= 1e-10 * abs(float(ours))
    post_logp = float(guide.log_prob_sum())
    assert np.isfinite(post_logp)


BAD = [
    (np.ones((5, 4, 2)), "Y must be 2-D"),
    (np.array([[1.0, np.inf], [0.0, 1.0], [1.0, 2.0]]), "Inf"),
    (np.array([[np.nan, np.nan], [0.0, 1.0], [1.0, 2.0]]), "rows with no observed"),
    (np.array([[1.0, np.nan], [0.0, np.nan], [1.0, np.nan]]), "columns with no observed"),
    (np.ones((1, 3)), "at least 2 samples, got n_samples = 1"),
    ([["a", "b"], ["c", "d"]], "Y must be a 2-D array of numbers"),
    (np.array([[1.0 + 2j, 0.0], [0.0, 1.0]]), "Complex data not supported"),
    (np.ones(4), "Reshape your data"),
    (np.ones((4, 0)), "0 feature"),
]


@pytest.mark.parametrize(("Y", "message"), BAD)
def test_bad_data_raises_and_is_not_mutated(Y, message):
    before = np.array(Y, dtype=object, copy=True)
    with pytest.raises(ValueError, match=message):
        pu.FactorAnalysis(1).fit(Y)
    assert np.array_equal(np.array(Y, dtype=object), before) or np.array_equal(
        np.asarray(Y, dtype=float), np.asarray(before, dtype=float), equal_nan=True
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_components": 0}, "n_components"),
        ({"n_components": 2, "method": "vb"}, "method"),
        ({"n_components": 2, "estimator": "naive"}, "estimator"),
        ({"n_components": 2, "num_samples": 0}, "num_samples"),
        ({"n_components": 2, "unroll_steps": -1}, "unroll_steps"),
        ({"n_components": 2, "lr": 0.0}, "lr"),
        ({"n_components": 2, "posterior_form": "qr"}, "posterior_form"),
        ({"n_components": 2, "monitor_every": 0}, "monitor_every"),
        ({"n_components": 2, "method": "unrolled", "clip_spikes": 1.0}, "clip_spikes"),
        ({"n_components": 2, "clip_spikes": 5.0}, "clip_spikes"),  # EM has no gradient steps
    ],
)
def test_bad_hyperparameters_raise(kwargs, name):
    Y, *_ = synthetic_fa(20, 4, 1, missing=0.1, seed=0)
    with pytest.raises(ValueError, match=name):
        pu.FactorAnalysis(**kwargs).fit(Y)


def test_clip_spikes_reaches_the_stochastic_fit():
    """A bound above every norm leaves the fit as it is (and counts no clipped step); a bound
    just above 1 clips and changes it."""
    Y, *_ = synthetic_fa(200, 6, 2, missing=0.2, seed=1)
    kw = dict(method="unrolled", max_iter=6, batch_size=20, tol=None, random_state=0)
    kw.update(progress=False, num_samples=2, unroll_steps=5)
    plain = pu.FactorAnalysis(2, **kw).fit(Y)
    loose = pu.FactorAnalysis(2, clip_spikes=1e12, **kw).fit(Y)
    assert torch.equal(loose.components_, plain.components_)
    assert sum(h["clipped"] for h in loose.history_) == 0
    tight = pu.FactorAnalysis(2, clip_spikes=1.01, **kw).fit(Y)
    assert sum(h["clipped"] for h in tight.history_) > 5
    assert not torch.allclose(tight.components_, plain.components_)


def test_every_estimator_reaches_the_unrolled_fit():
    """Same seed, same perturbations: with solves that converge (5 latent dimensions, 30 CG
    steps) the three surrogates give the same fit to rounding; stopped after two steps they
    give three different fits. (After one step from 0 the sample iterate is ``cε̄`` with ``c``
    optimal along the fixed direction ``ε̄``, so the network and output gradients of the
    sample term coincide.)"""
    Y, *_ = synthetic_fa(200, 10, 5, missing=0.2, seed=1)
    kw = dict(method="unrolled", max_iter=4, batch_size=20, tol=None, random_state=0)
    kw.update(progress=False, num_samples=2, preconditioner=False)
    names = ("network", "output", "network_samples")

    def fit(estimator, steps):
        return pu.FactorAnalysis(5, estimator=estimator, unroll_steps=steps, **kw).fit(Y)

    exact = [fit(e, 30).components_ for e in names]
    for W in exact:
        torch.testing.assert_close(W, exact[1], rtol=1e-8, atol=1e-10)
    short = [fit(e, 2).components_ for e in names]
    for i in range(3):
        assert not torch.allclose(short[i], short[i - 1], rtol=1e-6, atol=0)


def test_restore_best_returns_the_best_held_out_epoch():
    """Gradient EM at a learning rate that makes the held-out value jump: ``restore_best``
    returns the epoch with the best held-out log-likelihood (``score`` on the held-out points
    reproduces it), marks it, and keeps the whole history; EM refuses it."""
    Y, *_ = synthetic_fa(200, 6, 2, missing=0.2, seed=1)
    V, *_ = synthetic_fa(100, 6, 2, missing=0.2, seed=2)
    kw = dict(method="gradient_em", max_iter=15, batch_size=20, tol=None, random_state=0)
    kw.update(progress=False, lr=0.3, validation_data=V)
    fa = pu.FactorAnalysis(2, restore_best=True, **kw).fit(Y)
    values = [h["heldout_loglik"] for h in fa.history_]
    best = int(np.argmax(values))
    assert 0 < best < 14 and max(values) > values[-1] + 0.1
    assert fa.best_iteration_ == best and fa.history_[best]["best"] is True
    assert fa.score(V) == pytest.approx(values[best], rel=1e-10)
    plain = pu.FactorAnalysis(2, **kw).fit(Y)
    assert [h["heldout_loglik"] for h in plain.history_] == values
    assert plain.score(V) == pytest.approx(values[-1], rel=1e-10) and plain.best_iteration_ == 14
    for bad, method in ((True, "em"), (1, "unrolled")):
        est = pu.FactorAnalysis(2, method=method, restore_best=bad)
        with pytest.raises(ValueError, match="restore_best"):
            est.fit(Y)
        assert not hasattr(est, "params_")


def test_inputs_untouched_and_torch_input():
    Y, *_ = synthetic_fa(100, 6, 2, missing=0.3, seed=4)
    Yt = torch.as_tensor(Y.copy())
    copy_np, copy_t = Y.copy(), Yt.clone()
    fa = pu.FactorAnalysis(2, max_iter=5).fit(Yt)
    fa.transform(Y)
    fa.score(Yt)
    np.testing.assert_array_equal(Y, copy_np)
    assert torch.equal(torch.nan_to_num(Yt), torch.nan_to_num(copy_t))
    with pytest.raises(ValueError, match="features"):
        fa.score(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="not fitted"):
        pu.FactorAnalysis(2).transform(Y)


@pytest.mark.parametrize("method", ["em", "unrolled"])
def test_monitor_every_evaluates_held_out_every_kth_iteration_and_the_last(method):
    Y, *_ = synthetic_fa(300, 6, 2, missing=0.3, seed=5)
    kw = dict(max_iter=7, random_state=0, progress=False, validation_data=Y[:100], tol=0.0)
    fits = {k: pu.FactorAnalysis(2, method=method, monitor_every=k, **kw).fit(Y) for k in (1, 3)}
    every, sparse = fits[1].history_, fits[3].history_
    assert len(sparse) == len(every) == 7
    assert [h["iteration"] for h in sparse if "heldout_loglik" in h] == [2, 5, 6]
    for h, e in zip(sparse, every, strict=True):  # same fit, fewer evaluations
        if "heldout_loglik" in h:
            assert h["heldout_loglik"] == e["heldout_loglik"]
    torch.testing.assert_close(fits[3].components_, fits[1].components_, rtol=0, atol=0)
