"""Probabilistic unrolling and gradient EM (issue 4, tests 1-4; unrolling.md §C, §F.10-11).

Oracles: ``torch.autograd`` of the dense closed-form marginal log-likelihood
(:func:`fa_oracles.dense_marginal_loglik`), exact solves, and the exact EM fit.
"""

import math

import numpy as np
import pytest
import torch
from fa_oracles import dense_marginal_loglik, random_batch, random_params, synthetic_fa

import probunroll as pu
from probunroll.inference.stochastic import MONITOR_LOG_PATTERN
from probunroll.inference.unrolled import (
    ESTIMATORS,
    SURROGATES,
    UnrolledConfig,
    network_gradient_surrogate,
    network_samples_surrogate,
    output_gradient_surrogate,
    sample_variance,
    unrolled_objective,
    unrolled_solve,
)
from probunroll.models.factor_analysis import FactorAnalysisModel


def _flat_grad(value, params):
    grads = torch.autograd.grad(value, list(params.values()), materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads])


def _naive_surrogate(model, params, batch, solve):
    """The biased estimator: autodiff of (1/K) Σ_k log p_θ(ỹ, μ^{(I)} + σ_k^{(I)})."""
    return model.complete_loglik(params, batch, solve.mean + solve.samples).mean(0)


def _problem(D, seed):
    N = D + 6
    params = {k: v.requires_grad_(True) for k, v in random_params(N, D, seed).items()}
    return FactorAnalysisModel(D), params, random_batch(3, N, 0.3, seed + 1)


def _replicates(model, params, batch, surrogate, reps, seed):
    """Gradient estimates from ``reps`` independent draws of K=5 perturbations, exact solves."""
    g = torch.Generator().manual_seed(seed)
    D = params["W"].shape[1]
    out = []
    for _ in range(reps):
        solve = unrolled_solve(
            model, params, batch, num_samples=5, unroll_steps=20 * D, tol=1e-12, generator=g
        )
        out.append(_flat_grad(surrogate(model, params, batch, solve).sum(), params))
    return torch.stack(out)


def _z_scores(estimates, truth):
    se = estimates.std(0) / estimates.shape[0] ** 0.5
    diff = estimates.mean(0) - truth
    random = se > 1e-9 * (1 + truth.abs())
    # coordinates without Monte Carlo noise (e.g. the mean m: ∂A/∂m = 0) must be exact
    assert torch.all(diff[~random].abs() <= 1e-7 * (1 + truth[~random].abs()))
    return diff[random] / se[random]


@pytest.mark.parametrize("D", [6, 16, 32])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_match_autograd_within_4_standard_errors(D, estimator):
    model, params, batch = _problem(D, seed=D)
    truth = _flat_grad(dense_marginal_loglik(params, *batch).sum(), params)
    est = _replicates(model, params, batch, SURROGATES[estimator], reps=60, seed=D + 7)
    z = _z_scores(est, truth)
    assert (z.abs() <= 4).float().mean() >= 0.995, float(z.abs().max())
    assert 0.5 <= float(z.square().mean()) <= 1.6  # the errors are Monte Carlo noise, calibrated


@pytest.mark.parametrize("D", [6, 16])
def test_naive_autodiff_is_biased_by_trace_sigma_dA(D):
    """Naive autodiff converges to g + tr(Σ ∂θA): its sign of the log-det term is flipped."""
    model, params, batch = _problem(D, seed=D)
    truth = _flat_grad(dense_marginal_loglik(params, *batch).sum(), params)
    post = model.exact_posterior({k: v.detach() for k, v in params.items()}, batch)
    apply = model.precision_operator(params, batch)
    cols = torch.movedim(torch.linalg.cholesky(post.cov), -1, 0)  # Σ = CCᵀ, columns c_k
    bias = _flat_grad((cols * apply(cols)).sum(), params)  # ∂θ tr(Σ A_θ) = tr(Σ ∂θA)
    naive = _replicates(model, params, batch, _naive_surrogate, reps=60, seed=3)
    z_naive = _z_scores(naive, truth)
    assert float(z_naive.square().mean()) > 25  # far outside the Monte Carlo noise
    z_shifted = _z_scores(naive, truth + bias)
    assert 0.5 <= float(z_shifted.square().mean()) <= 1.6
    ours = _replicates(model, params, batch, network_gradient_surrogate, reps=60, seed=3)
    assert (ours.mean(0) - truth).norm() < 0.2 * bias.norm()


def _graded_problem():
    """FA with D=32 latents whose loadings span 2 decades (CG converges over ~20 steps), a
    batch of 4 points (30% missing) and K=5 fixed perturbations."""
    D, N = 32, 48
    params = random_params(N, D, seed=0)
    params["W"] = params["W"] * torch.logspace(-1.5, 0.5, D, dtype=torch.float64)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    batch = random_batch(4, N, 0.3, seed=1)
    model = FactorAnalysisModel(D)
    return (
        model,
        params,
        batch,
        model.perturbation(params, batch, torch.Generator().manual_seed(0), 5),
    )


def test_network_gradient_error_is_square_of_output_gradient_error():
    """Early-stopped CG, same perturbations: log err_NG / log err_OG slope ≥ 1.6."""
    model, params, batch, eps = _graded_problem()

    def grad(estimator, steps, tol=None):
        mode = "unroll" if estimator == "network" else "none"
        solve = unrolled_solve(
            model, params, batch, unroll_steps=steps, tol=tol, perturbations=eps, grad=mode
        )
        return _flat_grad(SURROGATES[estimator](model, params, batch, solve).sum(), params)

    ref = grad("output", 2000, tol=1e-13)
    assert (grad("network", 2000, tol=1e-13) - ref).norm() <= 1e-10 * ref.norm()
    err = np.array(
        [
            [float((grad(e, steps) - ref).norm() / ref.norm()) for e in ("output", "network")]
            for steps in (4, 6, 8, 10, 12, 14, 16)
        ]
    )
    assert np.all(err[:, 1] < err[:, 0])
    slope = np.polyfit(np.log(err[:, 0]), np.log(err[:, 1]), 1)[0]
    assert slope >= 1.6, (slope, err)


def test_network_samples_error_is_square_of_output_gradient_error():
    """Mean solved exactly, samples stopped early (same perturbations): the network gradient
    of the sample term has about the square of the output gradient's error (slope ≥ 1.6),
    by backpropagation through the steps and by the implicit adjoint solve."""
    model, params, batch, eps = _graded_problem()
    ref = _flat_grad(
        output_gradient_surrogate(
            model,
            params,
            batch,
            unrolled_solve(model, params, batch, unroll_steps=2000, tol=1e-13, perturbations=eps),
        ).sum(),
        params,
    )

    def grad(estimator, steps, mode="unroll"):
        solve = unrolled_solve(
            model,
            params,
            batch,
            unroll_steps=steps,
            perturbations=eps,
            mean_steps=2000,
            mean_tol=1e-10,  # the mean exact: only the samples are stopped early
            grad="none" if estimator == "output" else mode,
            mean_grad="none",
        )
        assert not solve.mean.requires_grad
        return _flat_grad(SURROGATES[estimator](model, params, batch, solve).sum(), params)

    steps = (6, 8, 10, 12, 14, 16, 18, 20)
    variants = (("output", "none"), ("network_samples", "unroll"), ("network_samples", "implicit"))
    err = np.array(
        [
            [float((grad(e, i, mode) - ref).norm() / ref.norm()) for e, mode in variants]
            for i in steps
        ]
    )
    assert np.all(err[:, 1] < err[:, 0]) and np.all(err[:, 2] < err[:, 0]), err
    for col in (1, 2):
        slope = np.polyfit(np.log(err[:, 0]), np.log(err[:, col]), 1)[0]
        assert slope >= 1.6, (col, slope, err)


def test_network_samples_is_the_output_mean_term_plus_the_network_sample_term():
    """One joint CG solve of [b, ε̄]: with ``mean_grad="none"`` the mean comes back without a
    graph, and the estimator's gradient is the output gradient's mean term plus the network
    gradient's sample term of the same solve."""
    model, params, batch = _problem(8, seed=2)
    eps = model.perturbation(params, batch, torch.Generator().manual_seed(3), 4)
    kw = dict(unroll_steps=5, perturbations=eps)
    joint = unrolled_solve(model, params, batch, mean_grad="none", **kw)
    assert not joint.mean.requires_grad and joint.samples.requires_grad
    full = unrolled_solve(model, params, batch, **kw)
    torch.testing.assert_close(joint.mean, full.mean.detach(), rtol=0, atol=0)
    sample_term = network_gradient_surrogate(model, params, batch, full) - model.complete_loglik(
        params, batch, full.mean
    )
    expected = _flat_grad(
        (model.complete_loglik(params, batch, full.mean.detach()) + sample_term).sum(), params
    )
    got = _flat_grad(network_samples_surrogate(model, params, batch, joint).sum(), params)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="mean_grad"):
        unrolled_solve(model, params, batch, mean_grad="adjoint", **kw)
    with pytest.raises(ValueError, match="apart"):  # one solve cannot differentiate it otherwise
        unrolled_solve(model, params, batch, mean_grad="implicit", **kw)
    config = UnrolledConfig(estimator="network_samples")
    assert config.solve_kwargs()["grad"] == "unroll"
    assert config.solve_kwargs()["mean_grad"] == "none"
    assert UnrolledConfig(estimator="network").solve_kwargs()["mean_grad"] is None


def test_checkpointed_and_implicit_network_gradients():
    model, params, batch = _problem(8, seed=5)
    eps = model.perturbation(params, batch, torch.Generator().manual_seed(1), 4)

    def grad(**kw):
        solve = unrolled_solve(model, params, batch, perturbations=eps, **kw)
        return _flat_grad(network_gradient_surrogate(model, params, batch, solve).sum(), params)

    plain = grad(unroll_steps=12)
    torch.testing.assert_close(grad(unroll_steps=12, checkpoint=12), plain)
    # checkpointed segments recompute plain CG (no restarts): same gradient for any segment
    torch.testing.assert_close(grad(unroll_steps=12, checkpoint=5), plain)
    exact = grad(unroll_steps=400, tol=1e-13)
    torch.testing.assert_close(grad(unroll_steps=40, checkpoint=10), exact, rtol=1e-6, atol=1e-8)
    implicit = grad(unroll_steps=400, tol=1e-13, grad="implicit")
    torch.testing.assert_close(implicit, exact, rtol=1e-8, atol=1e-10)


def test_unrolled_objective_reports_cg_steps_and_validates_config():
    model, params, batch = _problem(6, seed=2)
    value, info = unrolled_objective(model, params, batch, None, UnrolledConfig(3, 7))
    assert value.ndim == 0 and info["cg_iterations"].shape == (4, 3)
    assert int(info["cg_iterations"].max()) <= 7
    for bad in (
        {"num_samples": 0},
        {"unroll_steps": 0},
        {"estimator": "naive"},
        {"grad": "none"},
        {"checkpoint": 0},
        {"preconditioner": "ilu"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UnrolledConfig(**bad)


def _solve_errors(model, params, batch, eps, exact, steps, kind):
    """Median relative errors of the unrolled mean and samples against exact solves."""
    s = unrolled_solve(
        model,
        params,
        batch,
        num_samples=eps.shape[0],
        unroll_steps=steps,
        preconditioner=kind,
        perturbations=eps,
        grad="none",
    )
    truth = (exact.cov @ eps.unsqueeze(-1)).squeeze(-1)
    rel = lambda a, b: float(((a - b).norm(dim=-1) / b.norm(dim=-1)).median())  # noqa: E731
    return rel(s.mean, exact.mean), rel(s.samples, truth)


def test_shared_preconditioner_shrinks_the_truncated_solve_error():
    """FA's expected-precision preconditioner P = I + Wᵀdiag(p̄ψ)W against Jacobi, at large
    noise precision (ill-conditioned A_n): same fixed point, far smaller error after I steps."""
    N, D = 60, 24
    params = random_params(N, D, seed=8)
    params["log_psi"] = params["log_psi"] + 4.0  # noise variance ~ e⁻⁴: κ(A_n) ≈ 40
    model = FactorAnalysisModel(D)
    batch = random_batch(16, N, 0.3, seed=9)
    exact = model.exact_posterior(params, batch)
    eps = model.perturbation(params, batch, torch.Generator().manual_seed(1), 3)
    jacobi = _solve_errors(model, params, batch, eps, exact, 6, "jacobi")
    shared = _solve_errors(model, params, batch, eps, exact, 6, "shared")
    # measured: 0.011 vs 0.155 (mean), 0.012 vs 0.138 (samples)
    assert shared[0] < 0.15 * jacobi[0] and shared[1] < 0.15 * jacobi[1], (shared, jacobi)
    solved = unrolled_solve(
        model,
        params,
        batch,
        num_samples=3,
        unroll_steps=200,
        tol=1e-12,
        preconditioner="shared",
        perturbations=eps,
        grad="none",
    )
    torch.testing.assert_close(solved.mean, exact.mean, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="preconditioner"):
        unrolled_solve(model, params, batch, preconditioner="ilu")


def test_shared_preconditioner_needs_a_model_that_has_one():
    class NoShared:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "preconditioner":
                raise AttributeError(name)
            return getattr(self.inner, name)

    model, params, batch = _problem(6, seed=3)
    with pytest.raises(TypeError, match=r"preconditioner='shared' needs .* lacks preconditioner$"):
        unrolled_solve(NoShared(model), params, batch, preconditioner="shared")


def test_fits_reject_a_model_without_the_interface_before_starting():
    """A model missing interface methods fails up front with their names (TypeError), not
    inside the first minibatch; the parameters are left untouched. Both shipped stochastic
    models satisfy the :class:`StochasticModel` protocol."""
    from probunroll.inference import fit_gradient_em, fit_unrolled
    from probunroll.models.base import StochasticModel
    from probunroll.models.sbl_dictionary import SBLDictionaryModel

    model, params, batch = _problem(4, seed=5)
    data = tuple(t.detach() for t in batch)
    before = {k: v.detach().clone() for k, v in params.items()}

    class Partial:  # has only some of the interface
        precision_operator = model.precision_operator
        rhs = model.rhs

    with pytest.raises(TypeError, match="lacks perturbation, preconditioner_diag, complete_log"):
        fit_unrolled(Partial(), params, data, max_epochs=1)
    with pytest.raises(TypeError, match="lacks complete_loglik"):
        fit_gradient_em(Partial(), params, data, max_epochs=1)

    class NoShared(Partial):
        perturbation = model.perturbation
        preconditioner_diag = model.preconditioner_diag
        complete_loglik = model.complete_loglik

    with pytest.raises(TypeError, match=r"lacks preconditioner$"):
        fit_unrolled(NoShared(), params, data, UnrolledConfig(preconditioner="shared"))
    for k, v in params.items():
        assert torch.equal(v.detach(), before[k])
    assert isinstance(model, StochasticModel)
    assert isinstance(SBLDictionaryModel(torch.zeros(3, 5)), StochasticModel)
    assert not isinstance(Partial(), StochasticModel)


def test_the_interface_tuple_and_the_protocol_list_the_same_methods():
    """``check_model_methods`` (the up-front check) uses ``STOCHASTIC_INTERFACE``, read off
    the protocol: it must hold exactly the protocol's five methods, in order, and no helper
    attribute of ``Protocol``."""
    from probunroll.models.base import STOCHASTIC_INTERFACE, StochasticModel

    declared = {
        name
        for name, value in vars(StochasticModel).items()
        if callable(value) and not name.startswith("_")
    }
    assert declared == set(STOCHASTIC_INTERFACE)
    assert len(STOCHASTIC_INTERFACE) == len(set(STOCHASTIC_INTERFACE))
    assert STOCHASTIC_INTERFACE == (
        "precision_operator",
        "rhs",
        "perturbation",
        "preconditioner_diag",
        "complete_loglik",
    )


def test_unrolled_fa_with_the_shared_preconditioner_reaches_em():
    Y, *_ = synthetic_fa(600, 12, 3, 0.3, seed=7)
    em = pu.FactorAnalysis(3, method="em", dtype=torch.float64).fit(Y)
    fit = pu.FactorAnalysis(
        3,
        method="unrolled",
        num_samples=2,
        unroll_steps=5,
        preconditioner="shared",
        max_iter=30,
        batch_size=64,
        lr=0.03,
        tol=0.0,
        random_state=0,
        progress=False,
    ).fit(Y)
    assert abs(fit.score(Y) - em.score(Y)) <= 0.01 * abs(em.score(Y))
    with pytest.raises(ValueError, match="preconditioner"):
        pu.FactorAnalysis(3, method="unrolled", preconditioner="ilu").fit(Y)


@pytest.fixture(scope="module")
def fa_fits():
    """n=2000, 20 dims, 5 factors, 30% missing; EM, gradient EM and unrolled (K=5, I=20)."""
    Y, *_ = synthetic_fa(3000, 20, 5, missing=0.3, seed=11)
    train, test = Y[:2000], Y[2000:]
    common = dict(init="random", random_state=0, batch_size=250, lr=0.05, max_iter=40)
    fits = {
        "em": pu.FactorAnalysis(5, init="random", random_state=0, max_iter=500).fit(train),
        "gradient_em": pu.FactorAnalysis(5, method="gradient_em", **common).fit(train),
        "unrolled": pu.FactorAnalysis(
            5, method="unrolled", num_samples=5, unroll_steps=20, **common
        ).fit(train),
    }
    return fits, train, test


def test_unrolled_reaches_em_held_out_loglik(fa_fits):
    fits, _, test = fa_fits
    em, unrolled = fits["em"].score(test), fits["unrolled"].score(test)
    assert abs(unrolled - em) <= 0.01 * abs(em), (unrolled, em)
    hist = fits["unrolled"].history_
    assert {"iteration", "seconds", "loglik", "cg_iterations", "converged"} <= set(hist[-1])
    assert hist[-1]["cg_iterations"] <= 20


def test_gradient_em_and_unrolled_reach_the_same_optimum(fa_fits):
    fits, train, _ = fa_fits
    gem, unrolled = fits["gradient_em"].score(train), fits["unrolled"].score(train)
    assert abs(gem - unrolled) <= 0.01 * abs(gem), (gem, unrolled)
    cov = {k: f.get_covariance() for k, f in fits.items()}
    rel = (cov["unrolled"] - cov["gradient_em"]).norm() / cov["gradient_em"].norm()
    assert rel < 0.05


def test_fit_stochastic_same_minibatches_whatever_the_objective_draws():
    """Gradient EM (no draws) and unrolled (draws perturbations) see the same minibatches."""
    from probunroll.inference.stochastic import fit_stochastic

    data = (torch.arange(40.0).unsqueeze(-1),)
    params = {"w": torch.zeros(1)}

    def run(draws: int) -> list[list[float]]:
        seen = []

        def objective(p, batch, gen):
            torch.randn(draws, generator=gen)
            seen.append(batch[0].squeeze(-1).tolist())
            return (p["w"] * batch[0]).sum(), {}

        fit_stochastic(
            objective,
            params,
            data,
            batch_size=8,
            max_epochs=3,
            tol=None,
            generator=torch.Generator().manual_seed(3),
            progress=False,
        )
        return seen

    assert run(0) == run(17)


def test_param_lr_gives_named_parameters_their_own_rate():
    """One SGD step on −½‖θ − 1‖²: each parameter moves by its own rate times its gradient;
    unknown names and non-positive rates are refused."""
    from probunroll.inference.stochastic import fit_stochastic

    data = (torch.zeros(4, 1),)
    params = {"a": torch.zeros(2), "b": torch.zeros(1), "c": torch.zeros(1)}

    def objective(p, batch, gen):
        return -0.5 * sum(((v - 1.0) ** 2).sum() for v in p.values()), {}

    kw = dict(batch_size=4, max_epochs=1, tol=None, optimizer="sgd", lr=0.1, progress=False)
    fitted, history = fit_stochastic(objective, params, data, param_lr={"b": 0.5}, **kw)
    torch.testing.assert_close(fitted["a"], torch.full((2,), 0.1))
    torch.testing.assert_close(fitted["b"], torch.tensor([0.5]))
    torch.testing.assert_close(fitted["c"], torch.tensor([0.1]))
    assert history[-1]["lr"] == 0.1
    for bad, match in (
        ({"z": 0.1}, "unknown"),
        ({"b": 0.0}, "positive"),
        ({"b": True}, "positive"),
    ):
        with pytest.raises(ValueError, match=match):
            fit_stochastic(objective, params, data, param_lr=bad, **kw)
    assert torch.equal(params["b"], torch.zeros(1))


def test_fixed_parameters_are_left_to_project():
    """``fixed`` parameters get no gradient and no optimizer step; ``project`` alone moves
    them (a closed-form coordinate step); bad names and clashes raise, nothing mutated."""
    from probunroll.inference.stochastic import fit_stochastic

    data = (torch.zeros(4, 1),)
    params = {"a": torch.zeros(2), "b": torch.zeros(1)}
    seen = []

    def objective(p, batch, gen):
        seen.append(p["b"].requires_grad)
        return -0.5 * sum(((v - 1.0) ** 2).sum() for v in p.values()), {}

    kw = dict(batch_size=2, max_epochs=1, tol=None, optimizer="sgd", lr=0.1, progress=False)
    fitted, _ = fit_stochastic(objective, params, data, fixed=("b",), **kw)
    torch.testing.assert_close(fitted["a"], torch.full((2,), 0.19))  # two SGD steps
    assert fitted["b"].item() == 0.0 and seen == [False, False]

    def half_way(p):  # the closed-form maximiser of the objective in b is 1
        p["b"].add_(0.5 * (1.0 - p["b"]))

    fitted, _ = fit_stochastic(objective, params, data, fixed=("b",), project=half_way, **kw)
    torch.testing.assert_close(fitted["b"], torch.tensor([0.75]))
    for bad, match in (
        (dict(fixed=("z",)), "unknown"),
        (dict(fixed=("a", "b")), "every parameter"),
        (dict(fixed=("b",), param_lr={"b": 0.5}), "fixed"),
    ):
        with pytest.raises(ValueError, match=match):
            fit_stochastic(objective, params, data, **bad, **kw)
    assert torch.equal(params["b"], torch.zeros(1)) and torch.equal(params["a"], torch.zeros(2))


def _quadratic_fit(**kw):
    """fit_stochastic on −(w − 3)², monitored by the exact objective; returns history and calls."""
    from probunroll.inference.stochastic import fit_stochastic

    data = (torch.zeros(16, 1),)
    calls = []

    def objective(p, batch, gen):
        return -((p["w"] - 3.0) ** 2).sum(), {}

    def monitor(p):
        calls.append(float(p["w"]))
        return -float(((p["w"] - 3.0) ** 2).sum())

    _, history = fit_stochastic(
        objective,
        {"w": torch.zeros(1)},
        data,
        batch_size=8,
        lr=0.1,
        monitor=monitor,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        **kw,
    )
    return history, calls


def test_monitor_every_skips_epochs_but_always_monitors_the_last():
    history, calls = _quadratic_fit(max_epochs=10, monitor_every=4, tol=None)
    assert len(history) == 10
    assert [h["iteration"] for h in history if "loglik" in h] == [3, 7, 9]
    assert len(calls) == 3
    every, _ = _quadratic_fit(max_epochs=10, monitor_every=1, tol=None)
    # the same fit: skipping the monitor changes no parameter or timing field
    assert [h["objective"] for h in history] == [h["objective"] for h in every]
    for h, e in zip(history, every, strict=True):
        if "loglik" in h:
            assert h["loglik"] == e["loglik"]


def test_monitored_values_are_logged_at_info_level(caplog):
    """Runs without a terminal (no progress bar) still show each monitored value once logging
    is configured; the logged numbers are the history's."""
    import logging

    with caplog.at_level(logging.INFO, logger="probunroll.inference.stochastic"):
        history, _ = _quadratic_fit(max_epochs=6, monitor_every=3, tol=None)
    monitored = [h for h in history if "loglik" in h]
    records = [r for r in caplog.records if r.name == "probunroll.inference.stochastic"]
    assert len(records) == len(monitored) == 2
    for record, row in zip(records, monitored, strict=True):
        assert record.levelno == logging.INFO
        assert f"epoch {row['iteration']}," in record.getMessage()
        assert f"loglik {row['loglik']:.8g}" in record.getMessage()
        # the pattern benchmarks/plot_curves.py reads logs with gives the row back
        m = MONITOR_LOG_PATTERN.search(f"06:41:07 {record.getMessage()}")
        assert m is not None and int(m[2]) == row["iteration"]
        assert float(m[4]) == pytest.approx(row["loglik"], rel=1e-7)
    caplog.clear()
    _quadratic_fit(max_epochs=6, monitor_every=3, tol=None)  # default level: nothing shown
    assert not [r for r in caplog.records if r.name == "probunroll.inference.stochastic"]


def test_monitor_every_plateau_counts_monitored_epochs_only():
    # a tol so large that every change counts as calm: the fit stops at the (patience + 1)-th
    # monitored epoch, (patience + 1) · monitor_every epochs in, not at the (patience + 1)-th
    # epoch
    history, calls = _quadratic_fit(max_epochs=50, monitor_every=3, tol=1e9, patience=2)
    assert len(calls) == 3
    assert len(history) == 9


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_monitor_every_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="monitor_every"):
        _quadratic_fit(max_epochs=2, monitor_every=bad, tol=None)


def test_average_is_the_bias_corrected_moving_average_of_the_iterates():
    """The monitor sees (1 − γ^s)⁻¹ Σ_r (1 − γ) γ^(s−r) w_r over the s steps so far, summed
    here from an independent Adam run on the same objective (2 steps per epoch)."""
    gamma = 0.7
    _, calls = _quadratic_fit(max_epochs=6, tol=None, average=gamma)
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.1)
    iterates = []
    for _ in range(12):
        opt.zero_grad()
        ((w - 3.0) ** 2).sum().backward()
        opt.step()
        iterates.append(float(w.detach()))
    for epoch, seen in enumerate(calls):
        s = 2 * (epoch + 1)
        weights = [(1 - gamma) * gamma ** (s - r) for r in range(1, s + 1)]
        expected = sum(c * x for c, x in zip(weights, iterates[:s], strict=True)) / sum(weights)
        assert seen == pytest.approx(expected, rel=1e-6)  # float32 parameters
    _, last = _quadratic_fit(max_epochs=6, tol=None)
    assert last == pytest.approx(iterates[1::2], rel=1e-6)  # without it: the iterate
    _, zero = _quadratic_fit(max_epochs=6, tol=None, average=0.0)
    assert zero == last


def test_average_damps_gradient_noise():
    """SGD on −(w − y)² with y ~ N(3, 1) per minibatch hovers O(lr) around 3; the averaged
    iterate sits closer, over 20 seeds."""
    from probunroll.inference.stochastic import fit_stochastic

    def objective(p, batch, gen):
        return -((p["w"] - batch[0].mean()) ** 2), {}

    raw_err, avg_err = [], []
    for seed in range(20):
        data = (3.0 + torch.randn(256, generator=torch.Generator().manual_seed(seed)),)
        kw = dict(batch_size=4, max_epochs=4, optimizer="sgd", lr=0.2, tol=None, progress=False)
        kw["generator"] = torch.Generator().manual_seed(seed)
        raw, _ = fit_stochastic(objective, {"w": torch.zeros(())}, data, **kw)
        avg, _ = fit_stochastic(objective, {"w": torch.zeros(())}, data, average=0.95, **kw)
        target = float(data[0].mean())
        raw_err.append((float(raw["w"]) - target) ** 2)
        avg_err.append((float(avg["w"]) - target) ** 2)
    assert sum(avg_err) < 0.25 * sum(raw_err)


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.9"])
def test_average_must_be_in_0_1(bad):
    with pytest.raises(ValueError, match="average"):
        _quadratic_fit(max_epochs=2, tol=None, average=bad)


def test_restore_best_returns_the_monitored_peak_and_its_state():
    """Adam climbs w from 0 towards 3 while the monitor scores −(w − 1)²: the peak is the epoch
    nearest w = 1. ``restore_best`` returns that epoch's parameters (the ones the monitor saw),
    writes the objective's in-place state back to its value then, marks that row ``best``,
    and leaves the history whole; without a monitor it is refused; a monitor that is never
    finite leaves the last iterate."""
    from probunroll.inference.stochastic import fit_stochastic

    counter = torch.zeros(2)

    def objective(p, batch, gen):
        counter.add_(1.0)  # per-point state written in place (as SBL's α)
        return -((p["w"] - 3.0) ** 2).sum(), {}

    seen, counts = [], []

    def monitor(p):
        seen.append(float(p["w"]))
        counts.append(counter.clone())
        return -((float(p["w"]) - 1.0) ** 2)

    kw = dict(batch_size=2, max_epochs=12, lr=0.1, tol=None, progress=False)
    data = (torch.zeros(4),)
    params, history = fit_stochastic(
        objective,
        {"w": torch.zeros(())},
        data,
        monitor=monitor,
        restore_best=True,
        best_state=lambda: (counter, None),
        **kw,
    )
    best = max(range(12), key=lambda e: history[e]["loglik"])
    assert 0 < best < 11 and seen[-1] > 2.0  # the peak is inside, the fit went on past it
    assert float(params["w"]) == seen[best]
    assert torch.equal(counter, counts[best])
    assert [row.get("best", False) for row in history] == [e == best for e in range(12)]
    assert len(history) == 12 and history[-1]["loglik"] < history[best]["loglik"]
    with pytest.raises(ValueError, match="restore_best needs a monitor"):
        fit_stochastic(objective, {"w": torch.zeros(())}, data, restore_best=True, **kw)
    last, history = fit_stochastic(
        objective,
        {"w": torch.zeros(())},
        data,
        monitor=lambda p: math.nan,
        restore_best=True,
        **kw,
    )
    assert not any("best" in row for row in history) and float(last["w"]) > 2.0


def test_spike_clipper_bounds_a_spike_by_the_running_rms_of_past_norms():
    """Oracle: the running RMS recomputed by hand from the (clipped) norms fed so far."""
    from probunroll.inference.stochastic import SpikeClipper

    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(5, dtype=torch.float32, requires_grad=True)
    clip = SpikeClipper(10.0, torch.device("cpu"), decay=0.9, warmup=5)
    seen, hits = [], []
    for step in range(40):
        scale = {3: 1e2, 25: 1e4}.get(step, 1.0)  # a spike inside the warm-up passes, later not
        w.grad = scale * torch.randn(3, 4, generator=gen, dtype=torch.float64)
        b.grad = scale * torch.randn(5, generator=gen).float()
        raw = float(torch.cat([w.grad.flatten(), b.grad.double()]).norm())
        if step >= 5:
            weights = [(1 - 0.9) * 0.9 ** (step - 1 - j) for j in range(step)]
            rms = (sum(c * g**2 for c, g in zip(weights, seen, strict=True)) / sum(weights)) ** 0.5
            bound = 10.0 * rms
        else:
            bound = float("inf")
        hits.append(float(clip([w, b])))
        after = float(torch.cat([w.grad.flatten(), b.grad.double()]).norm())
        assert after == pytest.approx(min(raw, bound), rel=1e-5)
        seen.append(after)
    assert [i for i, h in enumerate(hits) if h] == [25]
    # a non-finite step is left as it is and does not enter the running RMS
    before = clip.mean_square.clone()
    w.grad = torch.full((3, 4), float("inf"), dtype=torch.float64)
    assert float(clip([w, b])) == 0.0 and torch.isinf(w.grad).all()
    assert torch.equal(clip.mean_square, before)
    for bad in (1.0, 0.5, True, "10"):
        with pytest.raises(ValueError, match="clip_spikes"):
            SpikeClipper(bad, torch.device("cpu"))


def test_clip_spikes_keeps_one_huge_gradient_from_throwing_the_fit_off():
    """Adam on −(w − 3)² where one step's gradient is 10⁴× too large: unclipped, w ends
    far from 3; clipped (the history counts that one step), it ends where the clean fit does."""
    from probunroll.inference.stochastic import fit_stochastic

    calls = []

    def objective(p, batch, gen):
        calls.append(1)
        scale = 1e4 if len(calls) % 128 == 40 else 1.0  # step 40 of each 128-step fit
        return -scale * (p["w"] - 3.0) ** 2, {}

    def fit(objective, **extra):  # the same minibatch order for every fit
        kw = dict(batch_size=8, max_epochs=8, lr=0.05, tol=None, progress=False, **extra)
        gen = torch.Generator().manual_seed(0)
        data = (torch.arange(128.0),)
        return fit_stochastic(objective, {"w": torch.zeros(())}, data, generator=gen, **kw)

    raw, _ = fit(objective)
    clipped, history = fit(objective, clip_spikes=5.0)
    clean, _ = fit(lambda p, b, g: (-((p["w"] - 3.0) ** 2), {}))
    assert sum(h["clipped"] for h in history) == 1
    assert abs(float(clipped["w"]) - float(clean["w"])) < 0.05  # 2.98 vs 3.00; unclipped 2.13
    assert abs(float(raw["w"]) - 3.0) > 0.5, float(raw["w"])


def test_sample_variance_is_unbiased_with_the_rao_blackwell_variance():
    """The α step's Monte Carlo diag Σ against the dense inverse: unbiased (4 standard
    errors), never below 1/A_ii, variance 2(Σ_ii − 1/A_ii)²/K, and below the plain σ²'s
    (2Σ_ii²/K) and the Jacobi control variate's on every coordinate."""
    g = torch.Generator().manual_seed(3)
    D, n = 6, 50_000
    X = torch.randn(D, D, generator=g, dtype=torch.float64)
    A = X @ X.T + 0.3 * torch.eye(D, dtype=torch.float64)
    sigma_true = torch.linalg.inv(A).diagonal()
    diag = A.diagonal().expand(n, D)
    eps = torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(A).T
    samples = torch.linalg.solve(A, eps.T).T  # σ = A⁻¹ε ~ N(0, Σ)
    est = sample_variance(samples.unsqueeze(0), eps.unsqueeze(0), diag)  # K = 1 per row
    se = est.std(0) / n**0.5
    assert torch.all((est.mean(0) - sigma_true).abs() < 4 * se)
    assert torch.all(est >= 1.0 / diag)
    excess = sigma_true - 1.0 / A.diagonal()
    assert torch.allclose(est.var(0), 2 * excess.square(), rtol=0.1)
    plain = samples.square().var(0)
    control = (samples.square() - (eps / diag).square()).var(0)
    assert torch.all(est.var(0) < plain) and torch.all(est.var(0) < control)
    # K samples per system average: the estimate from K=4 is the mean of four K=1 estimates
    four = sample_variance(
        samples[:8].reshape(2, 4, D).transpose(0, 1),
        eps[:8].reshape(2, 4, D).transpose(0, 1),
        diag[:2],
    )
    assert torch.allclose(four, est[:8].reshape(2, 4, D).mean(1))
