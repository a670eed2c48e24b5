"""Kernel similarity matching: objective identities, ADMM behaviour, digits and the ring."""

import math

import numpy as np
import pytest
import torch

from probunroll.coding.ksm import (
    KernelSimilarityMatching,
    coverage,
    ksm_admm,
    ksm_objective,
    linear_kernel,
    localization,
    rbf_kernel,
    sparse_coding_objective,
)
from probunroll.data.manifolds import ring


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    X = datasets.load_digits().data[:300].astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return torch.tensor(X)


def _random(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_kernel_objective_equals_explicit_sparse_coding_at_optimal_dictionary():
    X = _random((40, 12), 0)  # (N, d)
    Z = _random((6, 40), 1).abs()  # (k, N)
    omega, lam = 0.3, 0.02
    Xc = X.T  # paper convention (d, N)
    A = Xc @ Z.T @ torch.linalg.inv(Z @ Z.T + omega * torch.eye(6, dtype=torch.float64))
    explicit = sparse_coding_objective(Xc, A, Z, omega, lam)
    kernel = ksm_objective(Z, linear_kernel(X), omega, lam)
    assert abs(float(explicit - kernel)) <= 1e-8 * float(explicit)
    # the dense N×N form of the paper's statement agrees too
    S = Z.T @ Z + omega * torch.eye(40, dtype=torch.float64)
    dense = 0.5 * omega * torch.trace(linear_kernel(X) @ torch.linalg.inv(S)) + lam * Z.sum()
    assert abs(float(dense - kernel)) <= 1e-8 * float(dense)
    # A* is stationary for the explicit objective (autograd oracle)
    A = A.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(sparse_coding_objective(Xc, A, Z, omega, lam), A)
    assert float(g.norm()) < 1e-9


def test_admm_monotone_on_digits_and_reconstructs(digits):
    ksm = KernelSimilarityMatching(64, lam=0.01, n_iter=300, random_state=0).fit(digits)
    obj = np.array(ksm.objective_)
    assert np.all(np.diff(obj) <= 1e-9)
    assert ksm.primal_residual_[-1] < 1e-3
    rel = float((ksm.decode(ksm.codes_) - digits).norm() / digits.norm())
    assert rel < 0.12  # measured 0.085
    # Hebbian / anti-Hebbian view reproduces the decoder A* = W M^{-1}
    W, M = ksm.hebbian_weights()
    A = torch.linalg.solve(M, W.T).T
    assert torch.allclose(ksm.decode(ksm.codes_), ksm.codes_ @ A.T, atol=1e-10)


def test_admm_beats_long_ista(digits):
    """ADMM (1000 its) ends at or below backtracking ISTA run for 3000 iterations."""
    K = linear_kernel(digits)
    omega, lam, k = 0.1, 0.01, 64
    Z0 = _random((k, 300), 0).abs() / math.sqrt(k)
    admm = ksm_admm(K, k, omega=omega, lam=lam, n_iter=1000, Z0=Z0).objective[-1]

    def smooth(Z):  # autograd of the k×k form (itself checked against the dense form)
        return ksm_objective(Z, K, omega, 0.0)

    Z, step = Z0.clone(), 1.0
    for _ in range(3000):
        Zr = Z.clone().requires_grad_(True)
        f = smooth(Zr)
        (g,) = torch.autograd.grad(f, Zr)
        while True:  # Beck–Teboulle backtracking on the non-negative ℓ1 prox
            Zn = torch.clamp(Z - step * g - step * lam, min=0)
            d = Zn - Z
            if smooth(Zn) <= f + (g * d).sum() + d.pow(2).sum() / (2 * step):
                break
            step /= 2
        Z = Zn
    ista = float(smooth(Z) + lam * Z.sum())
    assert admm <= 1.01 * ista  # measured 7.892 vs 7.906


@pytest.mark.parametrize("lam", [0.05, 0.0])
def test_ring_units_localize_only_with_sparsity(lam):
    X, angles = ring(200)
    ksm = KernelSimilarityMatching(
        16, kernel="rbf", sigma=0.3, lam=lam, n_iter=400, l2_ball=True, random_state=0
    ).fit(X)
    loc = float(localization(ksm.codes_, angles).median())
    assert coverage(ksm.codes_) == 1.0
    if lam > 0:
        assert loc >= 0.9  # measured 0.994
        assert np.all(np.diff(ksm.objective_) <= 1e-9)
        assert float(ksm.codes_.norm(dim=1).max()) <= 1 + 1e-12
    else:
        assert loc < 0.6  # measured 0.44


def test_transform_recovers_training_codes(digits):
    ksm = KernelSimilarityMatching(32, lam=0.01, n_iter=300, random_state=0).fit(digits[:100])
    codes = ksm.transform(digits[:100])
    assert codes.shape == (100, 32) and bool((codes >= 0).all())
    Xh = ksm.decode(codes)
    rel = float((Xh - digits[:100]).norm() / digits[:100].norm())
    rel_fit = float((ksm.decode(ksm.codes_) - digits[:100]).norm() / digits[:100].norm())
    assert rel <= rel_fit + 0.02


def test_seed_reproduces():
    X, _ = ring(60)
    a = KernelSimilarityMatching(8, kernel="rbf", sigma=0.3, n_iter=50, random_state=3).fit(X)
    b = KernelSimilarityMatching(8, kernel="rbf", sigma=0.3, n_iter=50, random_state=3).fit(X)
    assert torch.equal(a.codes_, b.codes_)


def test_rbf_kernel_matches_scipy():
    distance = pytest.importorskip("scipy.spatial.distance")
    X = _random((10, 3), 0)
    K = rbf_kernel(X, sigma=0.7)
    ref = np.exp(-distance.cdist(X.numpy(), X.numpy(), "sqeuclidean") / (2 * 0.49))
    np.testing.assert_allclose(K.numpy(), ref, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "X", "match"),
    [
        ({}, np.ones(5), "X must be 2-D"),
        ({}, np.full((4, 2), np.nan), "X must be finite"),
        ({}, np.ones((0, 2)), "at least 1 sample"),
        ({}, np.ones((4, 2)) + 1j, "Complex data"),
        ({"kernel": "poly"}, np.ones((4, 2)), "kernel"),
        ({"omega": 0.0}, np.ones((4, 2)), "omega"),
        ({"lam": -1.0}, np.ones((4, 2)), "lam"),
        ({"rho": 0.0}, np.ones((4, 2)), "rho"),
        ({"n_components": 0}, np.ones((4, 2)), "n_components"),
    ],
)
def test_bad_input(kwargs, X, match):
    params = {"n_components": 2, "n_iter": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        KernelSimilarityMatching(**params).fit(X)


def test_sparse_input_is_refused():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(ValueError, match="sparse input"):
        KernelSimilarityMatching(2, n_iter=2).fit(scipy_sparse.eye(4, 3, format="csr"))


def test_transform_checks_features():
    ksm = KernelSimilarityMatching(2, n_iter=2).fit(np.ones((4, 3)) + np.eye(4, 3))
    assert ksm.n_features_in_ == 3
    with pytest.raises(ValueError, match=r"X has 5 features, but .* expecting 3"):
        ksm.transform(np.ones((2, 5)))


def test_fit_transform_returns_the_jointly_fitted_codes():
    X = _random((12, 4), 1)
    X_copy = X.clone()
    params = {"n_components": 3, "n_iter": 40, "random_state": 0}
    codes = KernelSimilarityMatching(**params).fit_transform(X)
    ksm = KernelSimilarityMatching(**params).fit(X)
    torch.testing.assert_close(codes, ksm.codes_, rtol=0, atol=0)
    assert torch.equal(X, X_copy)
