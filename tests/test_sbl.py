"""Sparse Bayesian learning: exact EM against independent references, EM against CoFEM,
dtypes, batching, non-negativity, pyro, bad input."""

import io
import itertools
import sys

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats
import torch

import probunroll as pu
from probunroll.data.synthetic import make_sparse_signal
from probunroll.models.sbl import SBLBatch, SBLModel, SBLParams

F64 = torch.float64


def nmse(est, truth):
    return float(((est - truth) ** 2).sum() / (truth**2).sum())


def reference_sbl_em(phi, y, mask, beta, iters, learn_noise, alpha0=1.0):
    """Textbook SBL EM in numpy on the observed rows, with explicit inverses (an oracle)."""
    obs = mask.astype(bool)
    P, yo = phi[obs], y[obs]
    alpha = np.full(phi.shape[1], alpha0)
    logliks = []
    for _ in range(iters + 1):
        sigma = np.linalg.inv(np.diag(alpha) + beta * P.T @ P)
        mu = beta * sigma @ P.T @ yo
        cov = np.eye(len(yo)) / beta + P @ np.diag(1 / alpha) @ P.T
        logliks.append(scipy.stats.multivariate_normal(np.zeros(len(yo)), cov).logpdf(yo))
        if len(logliks) == iters + 1:
            break
        gamma = 1 - alpha * np.diag(sigma)
        resid = yo - P @ mu
        alpha_new = 1 / (mu**2 + np.diag(sigma))
        if learn_noise:
            beta = len(yo) / (resid @ resid + gamma.sum() / beta)
        alpha = alpha_new
    return mu, np.diag(sigma), alpha, beta, logliks


@pytest.fixture(scope="module")
def small_problem():
    rng = np.random.default_rng(0)
    n, d = 30, 40
    phi = rng.standard_normal((n, d)) / np.sqrt(n)
    x = np.zeros(d)
    x[rng.choice(d, 5, replace=False)] = rng.standard_normal(5)
    mask = (rng.random(n) < 0.8).astype(float)
    y = (phi @ x + 0.05 * rng.standard_normal(n)) * mask
    return phi, y, mask, x


@pytest.mark.parametrize("form", ["precision", "woodbury"])
@pytest.mark.parametrize("learn_noise", [False, True])
def test_exact_em_equals_dense_reference(small_problem, form, learn_noise):
    phi, y, mask, _ = small_problem
    beta = None if learn_noise else 400.0
    sbl = pu.SparseBayesianLearning(
        "em",
        max_iter=25,
        noise_precision=beta,
        noise_precision_init=50.0,
        em_form=form,
        progress=False,
    ).fit(phi, y, mask=mask)
    mu, var, alpha, beta_ref, logliks = reference_sbl_em(
        phi, y, mask, 400.0 if beta else 50.0, 25, learn_noise
    )
    np.testing.assert_allclose(sbl.coef_.numpy(), mu, rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(sbl.posterior_variance_.numpy(), var, rtol=1e-8)
    np.testing.assert_allclose(sbl.alpha_.numpy(), alpha, rtol=1e-7)
    np.testing.assert_allclose(float(sbl.noise_precision_), beta_ref, rtol=1e-9)
    np.testing.assert_allclose([h["loglik"] for h in sbl.history_], logliks[:-1], rtol=1e-9)
    np.testing.assert_allclose(float(sbl.loglik_), logliks[-1], rtol=1e-9)


def test_em_loglik_never_decreases(small_problem):
    phi, y, mask, _ = small_problem
    sbl = pu.SparseBayesianLearning("em", max_iter=60, progress=False).fit(phi, y, mask=mask)
    ll = np.array([h["loglik"] for h in sbl.history_])
    assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[1:]))


def test_exact_em_and_predict_match_sklearn_ard():
    """Well-posed case (N ≫ D, every coefficient relevant): EM and sklearn's MacKay updates
    reach the same maximum of the evidence (same α, noise precision and weights), and so the
    same predictive means and standard deviations at new rows."""
    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    n, d = 200, 5
    X = rng.standard_normal((n, d))
    w = np.array([1.5, -2.0, 0.7, 1.0, -0.4])
    y = X @ w + 0.3 * rng.standard_normal(n)
    ard = sklearn_lm.ARDRegression(
        fit_intercept=False,
        threshold_lambda=1e300,
        alpha_1=0.0,
        alpha_2=0.0,
        lambda_1=0.0,
        lambda_2=0.0,
        tol=1e-14,
        max_iter=5000,
    ).fit(X, y)
    sbl = pu.SparseBayesianLearning("em", max_iter=3000, progress=False).fit(X, y)
    np.testing.assert_allclose(sbl.coef_.numpy(), ard.coef_, rtol=1e-7)
    np.testing.assert_allclose(sbl.alpha_.numpy(), ard.lambda_, rtol=1e-5)
    np.testing.assert_allclose(float(sbl.noise_precision_), ard.alpha_, rtol=1e-7)
    X_new = rng.standard_normal((10, d))
    ard_mean, ard_std = ard.predict(X_new, return_std=True)
    mean, std = sbl.predict(X_new, return_std=True)
    np.testing.assert_allclose(mean.numpy(), ard_mean, rtol=1e-7)
    np.testing.assert_allclose(std.numpy(), ard_std, rtol=1e-6)


@pytest.mark.parametrize("operator", ["dct", "gaussian"])
def test_em_and_cofem_agree(operator):
    """Issue 3, must-show 1: D=1024, N=512, 64 non-zeros, σ=0.01, 50 iterations, K=10."""
    prob = make_sparse_signal(1024, 512, 64, noise_std=0.01, operator=operator, random_state=0)
    fits = {
        m: pu.SparseBayesianLearning(
            m, max_iter=50, num_probes=10, noise_precision=1e4, random_state=0, progress=False
        ).fit(prob.Phi, prob.y, mask=prob.mask)
        for m in ("em", "cofem")
    }
    errors = {m: nmse(f.coef_, prob.x) for m, f in fits.items()}
    assert errors["em"] < 0.01
    assert abs(errors["em"] - errors["cofem"]) < 0.005
    cofem = fits["cofem"].history_
    assert all(h["converged"] for h in cofem)
    assert all(h["cg_iterations"] > 0 for h in cofem)
    # The SLQ log-likelihood tracks the exact one.
    for h_em, h_co in zip(fits["em"].history_[-5:], cofem[-5:], strict=True):
        assert abs(h_em["loglik"] - h_co["loglik"]) < 0.01 * abs(h_em["loglik"])


def test_float32_and_float64_agree():
    """Issue 3, must-show 5, on the DCT case of must-show 1."""
    prob = make_sparse_signal(1024, 512, 64, noise_std=0.01, random_state=3)
    errors = {}
    for dtype in (torch.float32, F64):
        sbl = pu.SparseBayesianLearning(
            "cofem",
            max_iter=50,
            noise_precision=1e4,
            random_state=0,
            dtype=dtype,
            progress=False,
        ).fit(prob.Phi, prob.y, mask=prob.mask)
        assert sbl.coef_.dtype == dtype
        errors[dtype] = nmse(sbl.coef_.double(), prob.x)
    assert errors[F64] < 0.01
    assert abs(errors[torch.float32] - errors[F64]) < 0.005


def test_learned_noise_precision_is_close_to_truth():
    """Where the noise is identifiable (N > D). Type-II ML over-estimates β somewhat (the
    pruned coefficients absorb a little noise): 1.08-1.43 times the realised precision over
    four seeds. With N < D the evidence may keep rising with β, and EM follows it (its
    log-likelihood never decreases, tested above)."""
    prob = make_sparse_signal(100, 100, 10, noise_std=0.05, random_state=4)
    phi = torch.randn(300, 100, dtype=F64, generator=torch.Generator().manual_seed(4)) / 300**0.5
    noise = 0.05 * torch.randn(300, dtype=F64, generator=torch.Generator().manual_seed(5))
    sbl = pu.SparseBayesianLearning("em", max_iter=200, progress=False).fit(
        phi, phi @ prob.x + noise
    )
    assert 0.8 < float(sbl.noise_precision_) * float(noise.var()) < 1.6
    assert nmse(sbl.coef_, prob.x) < 0.02


def test_batch_equals_one_by_one():
    prob = make_sparse_signal(128, 64, 6, noise_std=0.02, n_vectors=3, random_state=5)
    batch = pu.SparseBayesianLearning("em", max_iter=20, progress=False)
    batch.fit(prob.Phi, prob.y, mask=prob.mask)
    assert batch.coef_.shape == (3, 128)
    assert batch.alpha_.shape == (3, 128)
    assert batch.noise_precision_.shape == (3,)
    for t in range(3):
        one = pu.SparseBayesianLearning("em", max_iter=20, progress=False)
        one.fit(prob.Phi, prob.y[t], mask=prob.mask[t])
        torch.testing.assert_close(batch.coef_[t], one.coef_, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batch.noise_precision_[t], one.noise_precision_)


def test_joint_mmv_shares_alpha_and_beats_independent():
    prob = make_sparse_signal(
        256, 48, 12, noise_std=0.01, n_vectors=6, shared_support=True, random_state=6
    )
    kw = dict(max_iter=40, noise_precision=1e4, progress=False)
    joint = pu.SparseBayesianLearning("em", joint=True, **kw).fit(prob.Phi, prob.y, prob.mask)
    indep = pu.SparseBayesianLearning("em", **kw).fit(prob.Phi, prob.y, prob.mask)
    assert joint.alpha_.shape == (256,)
    assert nmse(joint.coef_, prob.x) < 0.5 * nmse(indep.coef_, prob.x)
    # One M-step of the joint update against its definition α = T / Σ_t E[x_t²].
    model = SBLModel(joint.operator_, joint=True, learn_noise=False)
    stats = joint._posterior
    new = model.m_step(joint._params, joint._batch, stats)
    expected = 6 / (stats.mean**2 + stats.variance).sum(0)
    torch.testing.assert_close(new.alpha[0], expected)


def test_operator_kinds_give_the_same_fit(small_problem):
    phi, y, mask, _ = small_problem
    kinds = [
        phi,
        torch.tensor(phi),
        scipy.sparse.csr_matrix(phi),
        pu.operators.Dense(torch.tensor(phi)),
    ]
    fits = [
        pu.SparseBayesianLearning("em", max_iter=10, noise_precision=400.0, progress=False)
        .fit(k, y, mask=mask)
        .coef_
        for k in kinds
    ]
    for coef in fits[1:]:
        torch.testing.assert_close(coef, fits[0], rtol=1e-10, atol=1e-12)


def test_cofem_reuses_probe_solves_and_warm_starts():
    prob = make_sparse_signal(256, 128, 8, noise_std=0.01, random_state=7)
    sbl = pu.SparseBayesianLearning(max_iter=15, noise_precision=1e4, random_state=0)
    sbl.progress = False
    sbl.fit(prob.Phi, prob.y, mask=prob.mask)
    rows = sbl.history_
    assert [r["iteration"] for r in rows] == list(range(15))
    assert all(b["seconds"] >= a["seconds"] for a, b in itertools.pairwise(rows))
    assert {"loglik", "cg_iterations", "converged", "cg_residual"} <= set(rows[0])
    # Same seed, same result.
    again = pu.SparseBayesianLearning(max_iter=15, noise_precision=1e4, random_state=0)
    again.progress = False
    torch.testing.assert_close(again.fit(prob.Phi, prob.y, mask=prob.mask).coef_, sbl.coef_)


def test_nonnegative_sbl_recovers_nonnegative_signal():
    prob = make_sparse_signal(256, 96, 10, noise_std=0.01, nonnegative=True, random_state=8)
    kw = dict(max_iter=40, noise_precision=1e4, progress=False)
    nonneg = pu.SparseBayesianLearning("em", nonnegative=True, **kw)
    nonneg.fit(prob.Phi, prob.y, mask=prob.mask)
    plain = pu.SparseBayesianLearning("em", **kw).fit(prob.Phi, prob.y, mask=prob.mask)
    assert bool((nonneg.coef_ >= 0).all())
    assert bool((plain.coef_ < 0).any())
    assert nmse(nonneg.coef_, prob.x) < 0.01
    # Pruned coefficients are exactly zero (modes, not the positive truncated means).
    assert int((nonneg.coef_ == 0).sum()) > 100


def test_nonnegative_m_step_uses_truncated_second_moment():
    """α ← 1/E[x²] with E[x²] of N(μ, s) truncated to [0, ∞), against scipy (μ=0.3, s=0.5:
    0.706; the research code's formula gives 0.672)."""
    from probunroll.models.base import PosteriorMoments

    mean = torch.tensor([[0.3, -0.4, 1.2]], dtype=F64)
    var = torch.tensor([[0.5, 0.2, 0.01]], dtype=F64)
    model = SBLModel(pu.operators.Dense(torch.eye(3, dtype=F64)), nonnegative=True)
    params = SBLParams(torch.ones(1, 3, dtype=F64), torch.ones(1, 1, dtype=F64))
    batch = SBLBatch(torch.zeros(1, 3, dtype=F64))
    new = model.m_step(params, batch, PosteriorMoments(mean=mean, variance=var))
    m, s = mean.numpy()[0], var.numpy()[0]
    sd = np.sqrt(s)
    truth = scipy.stats.truncnorm(-m / sd, np.inf, loc=m, scale=sd).moment(2)
    np.testing.assert_allclose(1 / new.alpha.numpy()[0], truth, rtol=1e-12)
    assert abs(truth[0] - 0.706) < 1e-3


@pytest.mark.parametrize("shape", ["single", "batch", "joint", "nonnegative"])
def test_to_pyro_log_joint_equals_ours(shape):
    pyro = pytest.importorskip("pyro")
    from pyro import poutine

    prob = make_sparse_signal(
        64,
        32,
        4,
        noise_std=0.05,
        n_vectors=None if shape == "single" else 3,
        nonnegative=shape == "nonnegative",
        random_state=9,
    )
    sbl = pu.SparseBayesianLearning(
        "em",
        max_iter=5,
        joint=shape == "joint",
        nonnegative=shape == "nonnegative",
        progress=False,
    ).fit(prob.Phi, prob.y, mask=prob.mask)
    model_fn, guide_fn = sbl.to_pyro()
    z = sbl.coef_.abs() + 0.01 if shape == "nonnegative" else sbl.coef_ + 0.1
    trace = poutine.trace(poutine.condition(model_fn, data={"x": z})).get_trace(prob.y, prob.mask)
    ours = sbl.model_.complete_loglik(sbl._params, sbl._batch, z.reshape(-1, 64))
    assert abs(float(trace.log_prob_sum()) - float(ours.sum())) < 1e-10 * max(
        1.0, abs(float(ours.sum()))
    )
    guide_trace = poutine.trace(guide_fn).get_trace(prob.y, prob.mask)
    x = guide_trace.nodes["x"]["value"]
    assert x.shape == z.shape
    if shape == "nonnegative":
        assert bool((x >= 0).all())
    pyro.clear_param_store()


def test_precision_pieces_match_dense():
    prob = make_sparse_signal(32, 16, 3, noise_std=0.1, n_vectors=2, random_state=10)
    model = SBLModel(prob.Phi)
    gen = torch.Generator().manual_seed(0)
    params = SBLParams(torch.rand(2, 32, dtype=F64, generator=gen) + 0.5, torch.full((2, 1), 7.0))
    batch = SBLBatch(prob.y, prob.mask)
    lg = model.linear_gaussian(params, batch)
    A = lg.dense_precision()
    x = torch.randn(2, 32, dtype=F64, generator=gen)
    torch.testing.assert_close(
        model.precision_operator(params, batch)(x), (A @ x[..., None])[..., 0]
    )
    torch.testing.assert_close(
        model.preconditioner_diag(params, batch), torch.diagonal(A, 0, -2, -1)
    )
    eps = model.perturbation(params, batch, gen, 4000)
    cov = torch.einsum("kti,ktj->tij", eps, eps) / 4000
    assert float((cov - A).norm() / A.norm()) < 0.1


# ---- bad input ------------------------------------------------------------------------------


def _good():
    rng = np.random.default_rng(11)
    phi = rng.standard_normal((20, 30))
    y = rng.standard_normal(20)
    mask = np.ones(20)
    mask[:5] = 0
    return phi, y, mask


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("nan_phi", "Phi contains NaN"),
        ("nan_y", "y contains NaN or Inf at observed"),
        ("shape", "y has 19 entries"),
        ("mask_shape", "mask has shape"),
        ("all_missing", "mask has rows with no observed entry"),
        ("noise", "noise_precision must be a positive"),
        ("noise_zero", "noise_precision must be a positive"),
        ("mask_values", "mask must hold only 0/1"),
        ("method", "method must be one of"),
        ("probes", "num_probes must be an integer"),
        ("phi_3d", "Phi must be a 2-D matrix"),
        ("tol", "tol must be a positive"),
    ],
)
def test_bad_input_raises_and_leaves_inputs_untouched(case, match):
    phi, y, mask = _good()
    kwargs = {"progress": False}
    if case == "nan_phi":
        phi[3, 4] = np.nan
    elif case == "nan_y":
        y[10] = np.nan
    elif case == "shape":
        y = y[:19]
        mask = mask[:19]
    elif case == "mask_shape":
        mask = mask[:10]
    elif case == "all_missing":
        mask = np.zeros(20)
    elif case == "noise":
        kwargs["noise_precision"] = -1.0
    elif case == "noise_zero":
        kwargs["noise_precision"] = 0.0
    elif case == "mask_values":
        mask = mask * 0.5
    elif case == "method":
        kwargs["method"] = "vb"
    elif case == "probes":
        kwargs["num_probes"] = 0
    elif case == "phi_3d":
        phi = phi[None]
    elif case == "tol":
        kwargs["tol"] = -1e-3
    copies = [a.copy() for a in (phi, y, mask)]
    with pytest.raises(ValueError, match=match):
        pu.SparseBayesianLearning(**kwargs).fit(phi, y, mask=mask)
    for before, after in zip(copies, (phi, y, mask), strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("method", ["em", "cofem"])
def test_tol_stops_em_when_the_means_settle(small_problem, method):
    phi, y, mask, _ = small_problem
    kw = dict(method=method, noise_precision=400.0, random_state=0, progress=False)
    stopped = pu.SparseBayesianLearning(max_iter=500, tol=1e-3, **kw).fit(phi, y, mask=mask)
    n = stopped.n_iter_
    assert 1 < n < 500
    changes = [row["mean_change"] for row in stopped.history_]
    assert changes[-1] <= 1e-3 < min(changes[:-1])  # stops at the first settled iteration
    # Identical to a run told to do exactly that many iterations.
    fixed = pu.SparseBayesianLearning(max_iter=n, **kw).fit(phi, y, mask=mask)
    torch.testing.assert_close(stopped.coef_, fixed.coef_, rtol=0, atol=0)
    torch.testing.assert_close(stopped.alpha_, fixed.alpha_, rtol=0, atol=0)
    # The rule's number: the largest relative change of a posterior mean, recomputed.
    before = pu.SparseBayesianLearning(max_iter=n - 1, **kw).fit(phi, y, mask=mask)
    if method == "em":
        ratio = (fixed.coef_ - before.coef_).norm() / before.coef_.norm()
        assert abs(float(ratio) - changes[-1]) < 1e-12


class _Terminal(io.StringIO):
    """A captured stream that says it is a terminal (tqdm's ``disable=None`` checks isatty)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("method", ["em", "cofem"])
def test_progress_bar_shows_on_a_terminal_only_when_asked(method, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    phi, y, mask = _good()
    kw = dict(max_iter=4, noise_precision=1e2, random_state=0)
    for progress in (True, False):
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        pu.SparseBayesianLearning(method, progress=progress, **kw).fit(phi, y, mask=mask)
        monkeypatch.undo()
        shown = terminal.getvalue()
        if progress:
            assert f"SBL ({method})" in shown and "/4" in shown, shown
        else:
            assert shown == ""
    assert capsys.readouterr() == ("", "")  # nothing on the real stdout / stderr either


def test_nan_at_missing_entries_is_allowed_and_untouched():
    phi, y, mask = _good()
    y[:5] = np.nan
    y_t = torch.tensor(y)
    before = y_t.clone()
    sbl = pu.SparseBayesianLearning("em", max_iter=3, progress=False).fit(phi, y_t, mask=mask)
    assert torch.isfinite(sbl.coef_).all()
    torch.testing.assert_close(y_t, before, equal_nan=True)


@pytest.mark.slow
def test_cofem_demo_case_reproduction():
    """The CoFEM paper's demo case (D=4096, N=1024, 256 non-zeros, subsampled DCT, σ=0.01,
    50 iterations, K=10): relative errors ‖x̂−x‖/‖x‖ of about 3.4%, CoFEM within 0.3 points of
    exact EM. Timing belongs to benchmarks/sbl.py."""
    prob = make_sparse_signal(4096, 1024, 256, noise_std=0.01, random_state=0)
    errors = {}
    for method in ("em", "cofem"):
        sbl = pu.SparseBayesianLearning(
            method,
            max_iter=50,
            num_probes=10,
            noise_precision=1e4,
            random_state=0,
            progress=False,
        ).fit(prob.Phi, prob.y, mask=prob.mask)
        errors[method] = nmse(sbl.coef_, prob.x) ** 0.5
    assert 0.025 < errors["em"] < 0.045
    assert abs(errors["cofem"] - errors["em"]) < 0.003


def _structured_operators():
    g = torch.Generator().manual_seed(12)
    kernel = torch.exp(-torch.arange(6, dtype=F64) / 2.0)
    ops = {
        "convolution": pu.operators.Convolution(kernel, 48, mode="causal"),
        "fourier": pu.operators.RealView(pu.operators.Fourier(48)),
        "compose": pu.operators.Compose(
            pu.operators.Dense(torch.randn(30, 48, dtype=F64, generator=g) / 30**0.5),
            pu.operators.DCT(48),
        ),
    }
    scipy_matrix = torch.randn(36, 48, dtype=F64, generator=g).numpy() / 36**0.5
    ops["scipy_linear_operator"] = scipy.sparse.linalg.LinearOperator(
        scipy_matrix.shape,
        matvec=lambda v: scipy_matrix @ v,
        rmatvec=lambda v: scipy_matrix.T @ v,
        dtype=scipy_matrix.dtype,
    )
    lo = pytest.importorskip("linear_operator")
    ops["linear_operator"] = lo.to_linear_operator(
        torch.randn(40, 48, dtype=F64, generator=g) / 40**0.5
    )
    return ops


@pytest.mark.parametrize(
    "name", ["convolution", "fourier", "compose", "scipy_linear_operator", "linear_operator"]
)
def test_any_operator_em_equals_dense_and_cofem_agrees(name):
    """Φ as a structured operator: exact EM equals EM on the same matrix made dense, and
    CoFEM (with the operator's exact Gram diagonal as preconditioner) agrees with both. Φ is
    passed to ``fit`` as given (a scipy or linear_operator object is adapted there)."""
    raw = _structured_operators()[name]
    dense = pu.operators.as_operator(raw).to_dense(dtype=F64)
    g = torch.Generator().manual_seed(13)
    x = torch.zeros(48, dtype=F64)
    x[torch.randperm(48, generator=g)[:5]] = torch.randn(5, dtype=F64, generator=g)
    y = dense @ x + 0.01 * torch.randn(dense.shape[0], dtype=F64, generator=g)
    kw = dict(max_iter=30, noise_precision=1e4, progress=False)
    em = pu.SparseBayesianLearning("em", **kw).fit(raw, y).coef_
    em_dense = pu.SparseBayesianLearning("em", **kw).fit(dense, y).coef_
    cofem = pu.SparseBayesianLearning("cofem", random_state=0, cg_tol=1e-8, **kw).fit(raw, y)
    cofem = cofem.coef_
    torch.testing.assert_close(em, em_dense, rtol=1e-8, atol=1e-10)
    assert float((cofem - em).norm() / em.norm()) < 0.05


def dense_predictive(phi_new, phi, mask_rows, alpha, beta):
    """``(Φ*μ-free) diag(Φ* Σ Φ*ᵀ) + 1/β`` from an explicit inverse (an oracle); per vector."""
    obs = mask_rows.astype(bool)
    P = phi[obs]
    sigma = np.linalg.inv(np.diag(alpha) + beta * P.T @ P)
    return np.einsum("md,de,me->m", phi_new, sigma, phi_new) + 1.0 / beta


@pytest.mark.parametrize(
    ("method", "form"), [("em", "precision"), ("em", "woodbury"), ("cofem", "auto")]
)
def test_predict_std_equals_dense_predictive_variance(small_problem, method, form):
    phi, y, mask, _ = small_problem
    rng = np.random.default_rng(5)
    phi_new = rng.standard_normal((7, phi.shape[1])) / np.sqrt(phi.shape[0])
    sbl = pu.SparseBayesianLearning(
        method, em_form=form, max_iter=30, random_state=0, cg_tol=1e-10, progress=False
    ).fit(phi, y, mask=mask)
    phi_copy = phi_new.copy()
    mean, std = sbl.predict(phi_new, return_std=True)
    np.testing.assert_array_equal(phi_new, phi_copy)
    np.testing.assert_allclose(mean.numpy(), phi_new @ sbl.coef_.numpy(), rtol=1e-12)
    var = dense_predictive(phi_new, phi, mask, sbl.alpha_.numpy(), float(sbl.noise_precision_))
    np.testing.assert_allclose(std.numpy() ** 2, var, rtol=1e-9)
    assert torch.equal(sbl.predict(phi_new), mean)


def test_predict_defaults_to_the_fitted_design_and_fills_the_masked_rows(small_problem):
    phi, y, mask, _ = small_problem
    sbl = pu.SparseBayesianLearning("em", max_iter=20, progress=False).fit(phi, y, mask=mask)
    mean, std = sbl.predict(return_std=True)
    assert mean.shape == std.shape == (phi.shape[0],)
    np.testing.assert_allclose(mean.numpy(), phi @ sbl.coef_.numpy(), rtol=1e-12)
    var = dense_predictive(phi, phi, mask, sbl.alpha_.numpy(), float(sbl.noise_precision_))
    np.testing.assert_allclose(std.numpy() ** 2, var, rtol=1e-9)


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("method", ["em", "cofem"])
def test_predict_batches_over_vectors(method, joint):
    rng = np.random.default_rng(3)
    n, d, t = 24, 32, 3
    phi = rng.standard_normal((n, d)) / np.sqrt(n)
    x = np.zeros((t, d))
    x[:, :4] = rng.standard_normal((t, 4))
    mask = (rng.random((t, n)) < 0.75).astype(float)
    y = (x @ phi.T + 0.05 * rng.standard_normal((t, n))) * mask
    sbl = pu.SparseBayesianLearning(
        method, joint=joint, max_iter=15, random_state=0, cg_tol=1e-10, progress=False
    ).fit(phi, y, mask=mask)
    phi_new = rng.standard_normal((5, d)) / np.sqrt(n)
    mean, std = sbl.predict(torch.from_numpy(phi_new), return_std=True)
    assert mean.shape == std.shape == (t, 5)
    alpha = sbl.alpha_.numpy()
    beta = np.broadcast_to(sbl.noise_precision_.numpy(), (t,))
    for i in range(t):
        a = alpha if joint else alpha[i]
        var = dense_predictive(phi_new, phi, mask[i], a, float(beta[i]))
        np.testing.assert_allclose(std[i].numpy() ** 2, var, rtol=1e-9)
        np.testing.assert_allclose(mean[i].numpy(), phi_new @ sbl.coef_[i].numpy(), rtol=1e-12)


def test_predict_bad_input(small_problem):
    phi, y, mask, _ = small_problem
    with pytest.raises(RuntimeError, match="not fitted"):
        pu.SparseBayesianLearning().predict(phi)
    sbl = pu.SparseBayesianLearning("em", max_iter=5, progress=False).fit(phi, y, mask=mask)
    with pytest.raises(ValueError, match="columns"):
        sbl.predict(phi[:, :-1])
    with pytest.raises(ValueError, match="NaN"):
        sbl.predict(np.full_like(phi, np.nan))
    nonneg = pu.SparseBayesianLearning("em", nonnegative=True, max_iter=5, progress=False)
    nonneg.fit(phi, y, mask=mask)
    with pytest.raises(ValueError, match="nonnegative"):
        nonneg.predict(phi, return_std=True)


def test_nonnegative_predict_is_the_truncated_posterior_mean(small_problem):
    """Non-negative SBL predicts with the mean of each coordinate's truncated posterior
    (oracle: scipy.stats.truncnorm on the fitted μ, Σ_ii), not with the modes in coef_."""
    from scipy.stats import truncnorm

    phi, y, mask, _ = small_problem
    sbl = pu.SparseBayesianLearning("em", nonnegative=True, max_iter=5, progress=False)
    sbl.fit(phi, y, mask=mask)
    mu = sbl._posterior.mean[0].numpy()
    sd = np.sqrt(sbl._posterior.variance[0].numpy())
    expected = truncnorm.mean(-mu / sd, np.inf, loc=mu, scale=sd)
    assert np.all(expected > 0) and not np.allclose(expected, sbl.coef_.numpy())
    got = sbl.predict(phi)
    assert got.shape == (phi.shape[0],)
    np.testing.assert_allclose(got.numpy(), np.asarray(phi) @ expected, rtol=1e-10, atol=1e-12)


def test_posterior_quadratic_form_forms_agree_with_dense():
    from probunroll.inference.em import posterior_quadratic_form

    rng = np.random.default_rng(9)
    n, d, t = 12, 20, 2
    phi = torch.from_numpy(rng.standard_normal((n, d)))
    alpha = torch.from_numpy(rng.uniform(0.5, 3.0, (t, d)))
    beta = torch.tensor([[4.0], [9.0]], dtype=F64)
    mask = torch.from_numpy((rng.random((t, n)) < 0.6).astype(float))
    y = torch.from_numpy(rng.standard_normal((t, n)))
    model = SBLModel(pu.operators.Dense(phi))
    lg = model.linear_gaussian(
        SBLParams(alpha=alpha, noise_precision=beta), SBLBatch(y=y, mask=mask)
    )
    v = torch.from_numpy(rng.standard_normal((6, d)))
    sigma = torch.linalg.inv(lg.dense_precision())
    expect = torch.einsum("md,tde,me->tm", v, sigma, v)
    for form in ("precision", "woodbury", "auto"):
        got = posterior_quadratic_form(lg, v, form=form)
        torch.testing.assert_close(got, expect, rtol=1e-10, atol=0)
        blocked = posterior_quadratic_form(lg, v, form=form, budget=50)  # 1–2 vectors a block
        torch.testing.assert_close(blocked, got, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="form"):
        posterior_quadratic_form(lg, v, form="dense")
