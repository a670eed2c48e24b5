"""CUDA-graph replay of the stochastic minibatch step (``fit_stochastic(cuda_graph=True)``).

Oracle: the eager step. With a deterministic objective (gradient EM's Fisher gradient, or the
unrolled surrogate on perturbations fixed by the batch) a replayed graph must give the eager
gradients and, over whole fits, the eager parameters. The GPU tests skip without CUDA; the
argument checks run everywhere.
"""

import numpy as np
import pytest
import torch
from fa_oracles import random_params, synthetic_fa

import probunroll as pu
from probunroll._capture import (
    capturing,
    cholesky,
    cholesky_inverse,
    cholesky_solve,
    triangular_cholesky_inverse,
    triangular_cholesky_solve,
)
from probunroll.inference.gradient_em import fisher_objective
from probunroll.inference.stochastic import GraphedStep, fit_stochastic, seed_capture_generator
from probunroll.inference.unrolled import UnrolledConfig, unrolled_objective
from probunroll.models.factor_analysis import FactorAnalysisModel
from probunroll.models.sbl_dictionary import (
    SBLDictionaryModel,
    SparseBayesianDictionaryLearning,
    planted_dictionary,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _fa_data(n, N, missing, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, N, generator=g) > missing).double()
    mask[:, 0] = 1.0
    y = torch.randn(n, N, generator=g, dtype=torch.float64) * mask
    return y.to(device), mask.to(device)


# -- everywhere ------------------------------------------------------------------------------
def test_capture_helpers_are_plain_on_the_cpu():
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    assert not capturing(A)
    assert torch.equal(cholesky(A), torch.linalg.cholesky(A))
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky(-A)  # outside a capture the error check stays


def test_triangular_forms_match_cholesky_solve_and_inverse():
    """The capture-time replacements of cholesky_solve / cholesky_inverse (batched)."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(3, 7, 7, generator=g, dtype=torch.float64)
    A = M @ M.mT + 7 * torch.eye(7, dtype=torch.float64)
    L = torch.linalg.cholesky(A)
    B = torch.randn(3, 7, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(triangular_cholesky_solve(B, L), torch.linalg.solve(A, B))
    torch.testing.assert_close(cholesky_solve(B, L), torch.linalg.solve(A, B))
    torch.testing.assert_close(triangular_cholesky_inverse(L), torch.linalg.inv(A))
    torch.testing.assert_close(cholesky_inverse(L), torch.linalg.inv(A))


def test_cuda_graph_arguments_are_checked():
    Y, *_ = synthetic_fa(40, 6, 2, 0.2, seed=0)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        pu.FactorAnalysis(2, method="unrolled", cuda_graph=True, device="cpu").fit(Y)
    with pytest.raises(ValueError, match="gradient_em' or 'unrolled"):
        pu.FactorAnalysis(2, method="em", cuda_graph=True).fit(Y)
    with pytest.raises(ValueError, match="True or False"):
        pu.FactorAnalysis(2, method="unrolled", cuda_graph=1).fit(Y)
    data = (torch.zeros(8, 1),)
    with pytest.raises(ValueError, match="CUDA device"):
        fit_stochastic(
            lambda p, b, g: (p["w"].sum(), {}),
            {"w": torch.zeros(1)},
            data,
            cuda_graph=True,
            progress=False,
        )


def test_sbl_dictionary_cuda_graph_arguments_are_checked():
    Y, _, _ = planted_dictionary(40, 6, 8, 2, noise=0.02, seed=0)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        SparseBayesianDictionaryLearning(8, "unrolled", cuda_graph=True, device="cpu").fit(Y)
    with pytest.raises(ValueError, match="gradient_em' or 'unrolled"):
        SparseBayesianDictionaryLearning(8, "em", cuda_graph=True).fit(Y)
    with pytest.raises(ValueError, match="True or False"):
        SparseBayesianDictionaryLearning(8, "unrolled", cuda_graph="yes").fit(Y)


# -- on a GPU --------------------------------------------------------------------------------
def _fixed_perturbation_model(D):
    """FA whose perturbations are a fixed function of the batch (no RNG): the unrolled
    objective is then deterministic, so graph and eager must agree."""

    class Fixed(FactorAnalysisModel):
        def perturbation(self, params, batch, generator, num_samples):
            y = batch[0]
            base = torch.sin(3.0 * y[:, :D] + torch.arange(D, device=y.device, dtype=y.dtype))
            return torch.stack([base * (k + 1) for k in range(num_samples)])

    return Fixed(D)


def _cuda_fit_kwargs(method, **kw):
    """FactorAnalysis settings of the GPU fits: float64 on CUDA, all epochs, seed 0."""
    common = dict(tol=0.0, random_state=0, device="cuda", dtype=torch.float64, progress=False)
    return dict(method=method, **common, **kw)


def _leaves(params, device):
    return {k: v.to(device).clone().requires_grad_(True) for k, v in params.items()}


def _check_replay(graphed, objective, leaves, data, idx):
    """One replay on ``idx`` gives the eager objective's value and gradients."""
    value, _ = graphed(idx)
    got = {k: p.grad.clone() for k, p in leaves.items()}
    got_value = value.clone()
    ref = _leaves({k: v.detach() for k, v in leaves.items()}, idx.device)
    ref_value, _ = objective(ref, tuple(t[idx] for t in data), None)
    (-ref_value).backward()
    torch.testing.assert_close(got_value, ref_value.detach(), rtol=1e-10, atol=1e-12)
    for k, p in ref.items():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["gradient_em", "unrolled", "unrolled_shared"])
def test_replayed_step_gives_the_eager_gradients(kind):
    """``unrolled_shared``: the batch-shared preconditioner's float64 Cholesky and inverse are
    captured too (cholesky_ex and triangular solves)."""
    dev = "cuda"
    N, D, B = 12, 5, 16
    data = _fa_data(64, N, 0.3, seed=1, device=dev)
    if kind == "gradient_em":
        model = FactorAnalysisModel(D)
        objective = lambda p, b, g: fisher_objective(model, p, b, g)  # noqa: E731
    else:
        model = _fixed_perturbation_model(D)
        precond = "shared" if kind == "unrolled_shared" else True
        config = UnrolledConfig(num_samples=2, unroll_steps=4, preconditioner=precond)
        objective = lambda p, b, g: unrolled_objective(model, p, b, g, config)  # noqa: E731
    leaves = _leaves(random_params(N, D, seed=2), dev)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).to(dev)
    graphed = GraphedStep(objective, leaves, data, order[:B])
    for lo in (16, 0, 48):  # replays on other minibatches, then the captured one
        _check_replay(graphed, objective, leaves, data, order[lo : lo + B])


@pytest.mark.gpu
@cuda
def test_graphed_gradient_em_fit_matches_the_eager_fit():
    Y, *_ = synthetic_fa(300, 10, 3, 0.3, seed=4)
    kw = _cuda_fit_kwargs("gradient_em", max_iter=4, batch_size=64, lr=0.02)
    eager = pu.FactorAnalysis(3, **kw).fit(Y)
    graphed = pu.FactorAnalysis(3, cuda_graph=True, **kw).fit(Y)
    for k in eager.params_:
        torch.testing.assert_close(graphed.params_[k], eager.params_[k], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(
        [h["loglik"] for h in graphed.history_], [h["loglik"] for h in eager.history_], rtol=1e-9
    )


@pytest.mark.gpu
@cuda
def test_graphed_unrolled_fit_draws_fresh_perturbations_and_learns():
    """Replays advance the CUDA generator (fresh draws each step), and the graphed unrolled fit
    lands where the eager one does (different random streams, same statistics)."""
    model = FactorAnalysisModel(3)
    config = UnrolledConfig(num_samples=1, unroll_steps=6)
    data = _fa_data(64, 10, 0.3, seed=5, device="cuda")
    leaves = _leaves(random_params(10, 3, seed=6), "cuda")
    objective = lambda p, b, g: unrolled_objective(model, p, b, g, config)  # noqa: E731
    idx = torch.arange(32, device="cuda")
    graphed = GraphedStep(objective, leaves, data, idx)
    first = graphed(idx)[0].clone()
    second = graphed(idx)[0].clone()
    assert torch.isfinite(first) and torch.isfinite(second) and first != second

    Y, *_ = synthetic_fa(600, 12, 3, 0.3, seed=7)
    kw = _cuda_fit_kwargs(
        "unrolled", num_samples=2, unroll_steps=12, max_iter=30, batch_size=64, lr=0.03
    )
    em = pu.FactorAnalysis(3, method="em", device="cuda", dtype=torch.float64).fit(Y)
    torch.cuda.manual_seed(0)
    graphed_fit = pu.FactorAnalysis(3, cuda_graph=True, **kw).fit(Y)
    target = em.score(Y)
    assert abs(graphed_fit.score(Y) - target) <= 0.01 * abs(target)


def test_capture_generator_is_seeded_from_the_fit_generator(monkeypatch):
    """The default generator a graph draws from gets a seed that is a function of the fit's
    generator alone (CPU stand-ins for the CUDA default generators)."""
    fake = (torch.Generator(), torch.Generator())
    monkeypatch.setattr(torch.cuda, "default_generators", fake)
    states = []
    for seed in (0, 0, 1):
        seed_capture_generator(torch.Generator().manual_seed(seed), torch.device("cuda", 1))
        states.append(fake[1].get_state())
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])
    assert fake[0].initial_seed() == torch.Generator().initial_seed()  # device 0 untouched


@pytest.mark.gpu
@cuda
def test_graphed_unrolled_fit_is_reproducible_from_its_seed():
    """Two graphed unrolled fits with the same random_state draw the same perturbations and
    end at the same parameters, whatever the default CUDA generator held before; another seed
    gives another fit."""
    Y, *_ = synthetic_fa(300, 10, 3, 0.3, seed=11)

    def fit(seed, before):
        torch.cuda.manual_seed(before)
        kw = _cuda_fit_kwargs("unrolled", num_samples=1, unroll_steps=6, max_iter=3, batch_size=64)
        kw["random_state"] = seed
        return pu.FactorAnalysis(3, cuda_graph=True, **kw).fit(Y).components_

    first, again, other = fit(0, 123), fit(0, 456), fit(1, 123)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def _fixed_perturbation_sbl(log_alpha):
    """SBL dictionary model whose perturbations are a fixed function of the batch."""

    class Fixed(SBLDictionaryModel):
        def perturbation(self, params, batch, generator, num_samples):
            y, index = batch
            D = self.log_alpha.shape[1]
            cols = torch.arange(D, device=y.device, dtype=y.dtype)
            base = torch.sin(index.to(y.dtype).unsqueeze(-1) + 0.7 * cols) * 2.0
            return torch.stack([base * (k + 1) for k in range(num_samples)])

    return Fixed(log_alpha)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["gradient_em", "unrolled", "unrolled_shared"])
def test_replayed_sbl_dictionary_step_updates_alpha_like_the_eager_step(kind):
    """SBL dictionary learning writes per-signal caches (α_t; the warm-start means) inside the
    step: the capture's warm-up must leave them untouched, and each replay must update them
    and give the gradients exactly as the eager step does. ``unrolled_shared``: the batch's
    Woodbury preconditioner (float64 Cholesky and solve of the N×N C̄) is captured too."""
    dev = "cuda"
    T, N, D, B = 48, 6, 10, 16
    g = torch.Generator().manual_seed(3)
    y = torch.randn(T, N, generator=g, dtype=torch.float64).to(dev)
    data = (y, torch.arange(T, device=dev))
    log_alpha = torch.randn(T, D, generator=g, dtype=torch.float64).to(dev)
    params = {
        "V": torch.randn(N, D, generator=g, dtype=torch.float64),
        "log_beta": torch.tensor(1.0, dtype=torch.float64),
    }
    models = [_fixed_perturbation_sbl(log_alpha.clone()) for _ in range(2)]
    for m in models:
        m.means = torch.zeros_like(m.log_alpha)

    def objective_for(model):
        if kind == "gradient_em":
            return lambda p, b, gen: fisher_objective(model, p, b, gen)
        precond = "shared" if kind == "unrolled_shared" else True
        config = UnrolledConfig(num_samples=2, unroll_steps=4, preconditioner=precond)
        return lambda p, b, gen: unrolled_objective(model, p, b, gen, config)

    graph_model, eager_model = models
    leaves = _leaves(params, dev)
    order = torch.randperm(T, generator=torch.Generator().manual_seed(0)).to(dev)
    state = (graph_model.log_alpha, graph_model.means)
    graphed = GraphedStep(objective_for(graph_model), leaves, data, order[:B], state=state)
    torch.testing.assert_close(graph_model.log_alpha, log_alpha, rtol=0, atol=0)
    assert not graph_model.means.any()  # the warm-up left no trace
    eager = objective_for(eager_model)
    for lo in (16, 0, 32, 0):  # the captured minibatch twice: its warm start has moved
        _check_replay(graphed, eager, leaves, data, order[lo : lo + B])
        torch.testing.assert_close(graph_model.log_alpha, eager_model.log_alpha)
        torch.testing.assert_close(graph_model.means, eager_model.means)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    "alpha",
    [{}, {"alpha_step": 0.25, "alpha_step_decay": (2, 0.7)}, {"noise_update": "em"}],
)
def test_graphed_sbl_dictionary_gradient_em_fit_matches_the_eager_fit(alpha):
    """Also with SAEM's decaying α steps, whose per-signal visit counts the graph updates, and
    with the closed-form β step, whose per-signal statistics it writes."""
    Y, _, _ = planted_dictionary(256, 8, 12, 2, noise=0.02, seed=1)
    kw = dict(max_iter=4, batch_size=64, lr=0.03, tol=None, random_state=0, progress=False)
    kw.update(device="cuda", dtype=torch.float64, **alpha)
    eager = SparseBayesianDictionaryLearning(12, "gradient_em", **kw).fit(Y)
    graphed = SparseBayesianDictionaryLearning(12, "gradient_em", cuda_graph=True, **kw).fit(Y)
    torch.testing.assert_close(graphed.components_, eager.components_, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(graphed.log_alpha_, eager.log_alpha_, rtol=1e-8, atol=1e-10)
    assert graphed.noise_precision_ == pytest.approx(eager.noise_precision_, rel=1e-8)
    np.testing.assert_allclose(
        [h["loglik"] for h in graphed.history_], [h["loglik"] for h in eager.history_], rtol=1e-9
    )


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"variance_steps": 10, "alpha_step_decay": (10, 1.0), "clip_spikes": 10.0},
        {
            "grad": "implicit",
            "variance_steps": 10,
            "alpha_step_decay": (10, 1.0),
            "clip_spikes": 10.0,
        },
        {"estimator": "output", "alpha_step_decay": (10, 1.0), "clip_spikes": 10.0},
        {
            "estimator": "output",
            "alpha_step_decay": (10, 1.0),
            "clip_spikes": 10.0,
            "mean_tol": 1e-3,
            "mean_steps": 30,
            "noise_floor": 1e-6,
            "restore_best": True,
        },
    ],
)
def test_graphed_unrolled_sbl_dictionary_fit_learns(extra):
    """Replayed unrolled steps (fresh CUDA draws, α_t and warm starts updated in the graph)
    raise the likelihood as much as the eager fit does; also with the no-graph variance steps
    and SAEM's decaying α steps in the captured step, spike clipping between replays, and the
    implicit gradient (its adjoint CG runs inside the captured backward), and the output
    gradient (no graph through the solver), and the mean solved to a tolerance (captured: it
    runs its ``mean_steps`` cap with converged systems frozen) under a noise floor, the best
    epoch restored."""
    Y, _, _ = planted_dictionary(512, 8, 12, 2, noise=0.02, seed=2)
    kw = dict(max_iter=15, batch_size=64, lr=0.03, tol=None, random_state=0, progress=False)
    kw.update(device="cuda", dtype=torch.float64, num_samples=4, unroll_steps=10, **extra)
    torch.cuda.manual_seed(0)
    graphed = SparseBayesianDictionaryLearning(12, "unrolled", cuda_graph=True, **kw).fit(Y)
    ll = [h["loglik"] for h in graphed.history_]
    # eager on the CPU with this data and initialisation: -8.0 after epoch 1, 0.58 after 15
    # (0.23 with the extra settings, 0.27 with the implicit gradient and clipping, 0.26 with
    # the output gradient, 0.27 with mean_tol and the floor)
    assert all(np.isfinite(ll)) and ll[-1] > ll[0] + 4.0, ll
