"""Every SAE type: shapes, dtypes, seeds, save/load, and the per-architecture invariants."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

import probunroll as pu
from probunroll import sae
from probunroll.linalg import sparsemax
from probunroll.sae.jumprelu import jumprelu, step

D_IN, C = 12, 40


def points(n=30, seed=0, dtype=torch.float64):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed), dtype=dtype)


FACTORIES = {
    "ReLUSAE": lambda s, dt: sae.ReLUSAE(D_IN, C, random_state=s, dtype=dt),
    "TopKSAE": lambda s, dt: sae.TopKSAE(D_IN, C, 4, random_state=s, dtype=dt),
    "BatchTopKSAE": lambda s, dt: sae.BatchTopKSAE(D_IN, C, 4, random_state=s, dtype=dt),
    "JumpReLUSAE": lambda s, dt: sae.JumpReLUSAE(D_IN, C, random_state=s, dtype=dt),
    "MatchingPursuitSAE": lambda s, dt: sae.MatchingPursuitSAE(
        D_IN, C, 4, random_state=s, dtype=dt
    ),
    "MatchingPursuitSAE-untied": lambda s, dt: sae.MatchingPursuitSAE(
        D_IN, C, 4, tied=False, nonnegative=True, dropout=0.2, random_state=s, dtype=dt
    ),
    "SpaDE": lambda s, dt: sae.SpaDE(D_IN, C, random_state=s, dtype=dt),
    "ArchetypalSAE": lambda s, dt: sae.ArchetypalSAE(
        points(dtype=dt), C, 4, delta=0.1, use_multiplier=True, random_state=s, dtype=dt
    ),
}


def data(n=64, seed=1, dtype=torch.float64):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def trained(name, dtype=torch.float64, steps=5):
    model = FACTORIES[name](0, dtype)
    sae.train(model, data(dtype=dtype), steps=steps, batch_size=32, lr=1e-2, log_every=steps)
    return model


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_forward(name, dtype):
    model = FACTORIES[name](0, dtype).eval()
    x = data(dtype=dtype)
    x_hat, z = model(x)
    assert x_hat.shape == (64, D_IN) and z.shape == (64, C)
    assert x_hat.dtype == z.dtype == dtype
    assert model.dictionary.shape == (C, D_IN)
    torch.testing.assert_close(model.decode(z), x_hat)
    torch.testing.assert_close(model.encode(x), z)


@pytest.mark.parametrize("name", FACTORIES)
def test_seed_reproducible_and_batch_invariant(name):
    a, b, other = (
        FACTORIES[name](3, torch.float64),
        FACTORIES[name](3, torch.float64),
        FACTORIES[name](4, torch.float64),
    )
    for (ka, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), ka
    assert not torch.equal(a.dictionary, other.dictionary)
    a.eval()
    x = data()
    z = a.encode(x)
    torch.testing.assert_close(torch.cat([a.encode(x[:10]), a.encode(x[10:])]), z)


@pytest.mark.parametrize("name", FACTORIES)
def test_save_load_reproduces_outputs(name, tmp_path):
    model = trained(name).eval()
    x = data(seed=7)
    x_hat, z = model(x)
    sae.save(model, tmp_path / name)
    loaded = sae.load(tmp_path / name)
    assert type(loaded) is type(model) and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x_hat2, z2 = loaded(x)
    assert torch.equal(z2, z) and torch.equal(x_hat2, x_hat)


def test_topk_exact_k_and_aux_zero_when_nothing_dead():
    model = sae.TopKSAE(D_IN, C, 5, random_state=0, dtype=torch.float64)
    x = data()
    z = model.encode(x)
    assert ((z != 0).sum(-1) == 5).all()
    assert ((model.encode(x, k=9) != 0).sum(-1) == 9).all()
    model.train()
    _, parts = model.loss(x)
    assert parts["aux"] == 0
    model.steps_since_fired.fill_(10_000)  # all but the ≤ 10 latents firing now are dead
    _, parts = model.loss(x[:2])
    assert parts["aux"] > 0


def test_batchtopk_counts_and_threshold_survives_save_load(tmp_path):
    model = sae.BatchTopKSAE(D_IN, C, 4, threshold_rate=0.1, random_state=0, dtype=torch.float64)
    x = data(n=256)
    assert (model.batch_topk(model.pre_activations(x), 4) != 0).sum() == 4 * 256
    sae.train(model, x, steps=100, batch_size=64, lr=5e-3, log_every=100)
    assert "threshold" in model.state_dict() and model.threshold > 0
    sae.save(model, tmp_path / "m")
    loaded = sae.load(tmp_path / "m")
    assert torch.equal(loaded.threshold, model.threshold)
    l0 = float(sae.metrics.l0(loaded.encode(x)))
    assert 2 <= l0 <= 8  # about k at eval through the threshold


def test_jumprelu_threshold_gradient_is_pseudo_derivative():
    eps = 0.1
    h = torch.tensor([[0.52, 0.30, 0.97, 0.55]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.50, 0.50, 1.00, 0.80], dtype=torch.float64, requires_grad=True)
    z = jumprelu(h, theta, eps)
    torch.testing.assert_close(
        z.detach(), torch.tensor([[0.52, 0.0, 0.0, 0.0]], dtype=torch.float64)
    )
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    gh, gt = torch.autograd.grad((z * g).sum(), (h, theta))
    # K((h − θ)/ε) is 1 for |h − θ| < ε/2: entries 0 (0.02) and 2 (0.03), not 1 or 3
    expected = torch.tensor([-1.0 * 0.5 / eps, 0.0, -3.0 * 1.0 / eps, 0.0], dtype=torch.float64)
    torch.testing.assert_close(gt, expected)
    torch.testing.assert_close(gh, torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    s = step(h, theta, eps)
    gh, gt = torch.autograd.grad(s.sum(), (h, theta))
    torch.testing.assert_close(
        gt, torch.tensor([-1 / eps, 0.0, -1 / eps, 0.0], dtype=torch.float64)
    )
    assert (gh == 0).all()
    model = trained("JumpReLUSAE", steps=20)
    assert (model.threshold > 0).all()


def test_spade_simplex_and_distance_form():
    model = sae.SpaDE(D_IN, C, scale_init=0.05, random_state=0, dtype=torch.float64)
    with torch.no_grad():
        model.b_dec.normal_(generator=torch.Generator().manual_seed(2))
    x = data()
    z = model.encode(x)
    assert (z >= 0).all()
    torch.testing.assert_close(z.sum(-1), torch.ones(64, dtype=torch.float64))
    dist2 = torch.cdist(x - model.b_dec, model.prototypes) ** 2
    torch.testing.assert_close(z, sparsemax(-model.scale * dist2), atol=1e-10, rtol=0)
    l0s = []
    for lam in (1e-3, 1e-2, 1e-1, 1.0):
        m = sae.SpaDE(D_IN, C, scale_init=lam, random_state=0, dtype=torch.float64)
        l0s.append(float(sae.metrics.l0(m.encode(x))))
    assert all(a > b for a, b in itertools.pairwise(l0s)), l0s
    assert abs(float(model.scale.detach()) - 0.05) < 1e-12


def hull_distance(atom: np.ndarray, C: np.ndarray) -> float:
    """Oracle: distance from ``atom`` to conv(C) via NNLS with a heavily weighted sum-to-one row."""
    M = 1e4
    A = np.vstack([C.T, M * np.ones((1, C.shape[0]))])
    w, _ = nnls(A, np.concatenate([atom, [M]]), maxiter=5000)
    return float(np.linalg.norm(w @ C - atom))


@pytest.mark.parametrize("n_points, init", [(30, "random"), (10, "random"), (60, "identity")])
def test_archetypal_atoms_in_convex_hull(n_points, init):
    P = points(n=n_points)
    model = sae.ArchetypalSAE(P, C, 4, delta=0.0, init=init, random_state=0, dtype=torch.float64)
    sae.train(model, data(), steps=10, batch_size=32, lr=5e-2, log_every=10)
    W = model.W.detach()
    assert (W >= 0).all()
    torch.testing.assert_close(W.sum(-1), torch.ones(C, dtype=torch.float64), atol=1e-6, rtol=0)
    D = model.dictionary.detach().numpy()
    assert max(hull_distance(a, P.numpy()) for a in D) < 1e-6
    relaxed = sae.ArchetypalSAE(P, C, 4, delta=0.3, random_state=0, dtype=torch.float64)
    sae.train(relaxed, data(), steps=10, batch_size=32, lr=5e-2, log_every=10)
    assert (relaxed.relax.norm(dim=-1) <= 0.3 + 1e-12).all()
    assert relaxed.relax.norm(dim=-1).max() > 0


def test_archetypal_dictionary_read_does_not_mutate():
    model = FACTORIES["ArchetypalSAE"](0, torch.float64)
    with torch.no_grad():
        model.W.add_(0.3)  # off the simplex
    before = model.W.clone()
    model.train()
    model.dictionary
    model.eval()
    model.dictionary
    assert torch.equal(model.W, before)


def test_mp_dropout_train_only_and_survives_eval():
    model = sae.MatchingPursuitSAE(D_IN, C, 6, dropout=0.5, random_state=0, dtype=torch.float64)
    x = data()
    model.eval()
    assert torch.equal(model.encode(x), model.encode(x))
    model.train()
    torch.manual_seed(0)
    z1 = model.encode(x)
    model.eval()
    model.train()
    assert model.dropout == 0.5
    assert not torch.equal(model.encode(x), z1)  # a fresh mask, so dropout is still on


@torch.no_grad()
def test_mp_adaptive_k_and_tolerance():
    model = sae.MatchingPursuitSAE(D_IN, C, 4, random_state=0, dtype=torch.float64).eval()
    x = data()
    errs = []
    for k in (1, 2, 4, 8, 16):
        x_hat = model.decode(model.encode(x, k=k))
        errs.append(float(((x - x_hat) ** 2).sum()))
    assert all(a > b for a, b in itertools.pairwise(errs))
    z = model.encode(x, k=40, tol=0.1)
    r = x - model.decode(z)
    assert ((r**2).sum(-1) <= 0.1 * ((x - model.b_dec) ** 2).sum(-1) + 1e-12).all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: sae.TopKSAE(D_IN, C, C + 1), "k="),
        (lambda: sae.TopKSAE(D_IN, C, 0), "k must"),
        (lambda: sae.ReLUSAE(D_IN, C, l1_coef=-1.0), "l1_coef"),
        (lambda: sae.MatchingPursuitSAE(D_IN, C, 3, dropout=1.0), "dropout"),
        (lambda: sae.SpaDE(D_IN, C, scale_init=0.0), "scale_init"),
        (lambda: sae.JumpReLUSAE(D_IN, C, bandwidth=0.0), "bandwidth"),
        (lambda: sae.ArchetypalSAE(torch.randn(5), C, 3), "points"),
        (lambda: sae.ReLUSAE(0, C), "d must"),
    ],
)
def test_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", ["TopKSAE", "MatchingPursuitSAE", "SpaDE"])
def test_bad_input_names_argument_and_mutates_nothing(name):
    model = FACTORIES[name](0, torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="x must have shape"):
        model.encode(torch.randn(5, D_IN + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        model.encode(torch.randn(5, D_IN))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_public_names():
    for name in (
        "ReLUSAE",
        "TopKSAE",
        "BatchTopKSAE",
        "JumpReLUSAE",
        "MatchingPursuitSAE",
        "SpaDE",
        "ArchetypalSAE",
    ):
        assert hasattr(pu.sae, name)
    for name in ("explained_variance", "l0", "dead_fraction", "stability", "mcc", "coherence"):
        assert callable(getattr(pu.sae.metrics, name))


def test_mp_gram_cache_in_eval_follows_dictionary_updates():
    model = sae.MatchingPursuitSAE(8, 32, 3, random_state=0).eval()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    first = model.encode(x)
    G = model._gram_cache[1]
    torch.testing.assert_close(model.encode(x), first)
    assert model._gram_cache[1] is G  # reused: the dictionary did not change
    with torch.no_grad():
        model.W_dec.mul_(-1)  # an in-place update bumps the version counter
    flipped = model.encode(x)
    assert model._gram_cache[1] is not G
    G = model._gram_cache[1]
    torch.testing.assert_close(flipped, -first)
    fresh = sae.MatchingPursuitSAE(8, 32, 3, random_state=0)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval().encode(x), flipped)
    model.W_dec = torch.nn.Parameter(model.W_dec.detach().clone())  # replaced: recomputed
    torch.testing.assert_close(model.encode(x), flipped)
    assert model._gram_cache[1] is not G
    model.train()
    model.encode(x)
    assert model._gram_cache is None  # no cache while training
