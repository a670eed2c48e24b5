"""Matching pursuit and OMP: invariants, oracles, gradients and support recovery."""

import itertools

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

from probunroll.linalg import (
    gram_matrix,
    matching_pursuit,
    mp_reevaluate,
    mp_select,
    orthogonal_matching_pursuit,
)
from probunroll.linalg.pursuit import _argmax_rows


def unit_rows(A: torch.Tensor) -> torch.Tensor:
    return A / A.norm(dim=-1, keepdim=True)


def naive_mp(x, D, k, nonnegative=False, W=None):
    """Oracle: the unrolled loop that recomputes every correlation and updates with one-hots."""
    W = D if W is None else W
    r = x
    codes = torch.zeros(x.shape[0], D.shape[0], dtype=x.dtype)
    idx, residuals = [], [r]
    for _ in range(k):
        alpha = r @ W.T
        j = (alpha if nonnegative else alpha.abs()).argmax(-1).detach()
        onehot = torch.nn.functional.one_hot(j, D.shape[0]).to(x.dtype)
        a = (alpha * onehot).sum(-1)
        if nonnegative:
            a = torch.relu(a)
        codes = codes + a[:, None] * onehot
        r = r - (a[:, None] * onehot) @ D
        idx.append(j)
        residuals.append(r)
    return codes, torch.stack(idx, 1), residuals


def problem(B=16, d=12, c=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    D = unit_rows(torch.randn(c, d, generator=g, dtype=dtype))
    x = torch.randn(B, d, generator=g, dtype=dtype)
    return x, D


@pytest.mark.parametrize("nonnegative", [False, True])
def test_energy_drops_by_a_squared_and_matches_oracle(nonnegative):
    x, D = problem()
    sel = mp_select(x, D, 10, nonnegative=nonnegative)
    drops = sel.energy[:, :-1] - sel.energy[:, 1:]
    torch.testing.assert_close(drops, sel.coefficients**2, atol=1e-6, rtol=0)
    assert (drops >= -1e-12).all()
    codes, idx, residuals = naive_mp(x, D, 10, nonnegative)
    res = matching_pursuit(x, D, 10, nonnegative=nonnegative)
    torch.testing.assert_close(res.codes, codes)
    torch.testing.assert_close(res.residual, residuals[-1])
    true_energy = torch.stack([(r * r).sum(-1) for r in residuals], 1)
    torch.testing.assert_close(sel.energy, true_energy)
    if not nonnegative:  # every step applied: same indices as the oracle
        assert torch.equal(res.indices, idx)


def test_residual_orthogonal_to_last_atom_and_reconstruction():
    x, D = problem(seed=1)
    for t in (1, 3, 7):
        res = matching_pursuit(x, D, t)
        last = D[res.indices[:, -1]]
        assert (res.residual * last).sum(-1).abs().max() < 1e-12
        torch.testing.assert_close(res.codes @ D + res.residual, x)
        assert ((res.codes != 0).sum(-1) <= t).all()


@pytest.mark.parametrize("untied", [False, True])
def test_gram_and_gather_select_identical_atoms(untied):
    x, D = problem(B=256, d=32, c=300, seed=2, dtype=torch.float32)
    W = unit_rows(D + 0.1 * torch.randn(D.shape, generator=torch.Generator().manual_seed(9)))
    sel = None if not untied else W
    a = mp_select(x, D, 20, selector=sel, method="gram")
    b = mp_select(x, D, 20, selector=sel, method="gather")
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.coefficients, b.coefficients, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.energy, b.energy, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method", ["gram", "gather"])
@pytest.mark.parametrize("nonnegative, untied", [(False, False), (True, False), (False, True)])
def test_triangular_gradients_equal_naive_backprop(nonnegative, untied, method):
    x, D = problem(B=8, d=10, c=30, seed=3)
    W = unit_rows(
        D + 0.2 * torch.randn(D.shape, generator=torch.Generator().manual_seed(4), dtype=D.dtype)
    )
    leaves = [t.clone().requires_grad_() for t in ((x, D, W) if untied else (x, D))]
    g = torch.Generator().manual_seed(5)
    w_codes = torch.randn(8, 30, generator=g, dtype=x.dtype)
    w_res = torch.randn(8, 10, generator=g, dtype=x.dtype)

    def loss(codes, residual):
        return (codes * w_codes).sum() + (residual * w_res).sum() + (residual**2).sum()

    sel = leaves[2] if untied else None
    res = matching_pursuit(
        leaves[0], leaves[1], 6, nonnegative=nonnegative, selector=sel, method=method
    )
    fast = torch.autograd.grad(loss(res.codes, res.residual), leaves)
    codes, _, residuals = naive_mp(leaves[0], leaves[1], 6, nonnegative, sel)
    slow = torch.autograd.grad(loss(codes, residuals[-1]), leaves)
    for f, s in zip(fast, slow, strict=True):
        assert (f - s).norm() <= 1e-5 * s.norm()


def test_blocked_argmax_is_first_argmax_with_ties():
    g = torch.Generator().manual_seed(11)
    v = torch.randint(-4, 5, (64, 512), generator=g).float()  # many exact ties, both signs
    for absolute in (False, True):
        want = (v.abs() if absolute else v).argmax(-1)
        assert torch.equal(_argmax_rows(v, absolute), want)
    odd = v[:, :300]  # not a multiple of the block: plain argmax
    assert torch.equal(_argmax_rows(odd, True), odd.abs().argmax(-1))


def test_gram_matrix_and_precomputed_gram():
    x, D = problem(B=64, d=16, c=1500, seed=12, dtype=torch.float32)
    G = gram_matrix(D)
    torch.testing.assert_close(G, D @ D.T, atol=1e-6, rtol=0)
    a = matching_pursuit(x, D, 5, method="gram")
    b = matching_pursuit(x, D, 5, method="gram", gram=G)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.codes, b.codes)
    # a stopping rule that never fires: the re-evaluation gathers its system from G instead
    # of reading it off the selection loop, with the same codes
    c = matching_pursuit(x, D, 5, tol=1e-12, method="gram")
    assert torch.equal(a.indices, c.indices)
    torch.testing.assert_close(a.codes, c.codes)
    with pytest.raises(ValueError, match="gram"):
        mp_select(x, D, 5, gram=G[:10])


def test_reevaluate_float32_close_to_float64():
    x, D = problem(B=32, d=20, c=64, seed=6)
    sel = mp_select(x, D, 8)
    a64 = mp_reevaluate(x, D, sel.indices, sel.active)
    a32 = mp_reevaluate(x.float(), D.float(), sel.indices, sel.active)
    torch.testing.assert_close(a32.double(), a64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a64, sel.coefficients)


def test_orthonormal_dictionary_selects_top_correlations():
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    x = torch.randn(10, 16, generator=g, dtype=torch.float64)
    res = matching_pursuit(x, Q, 5)
    top = (x @ Q.T).abs().topk(5, dim=-1).indices
    assert torch.equal(res.indices, top)
    full = matching_pursuit(x, Q, 16)
    assert full.residual.abs().max() < 1e-12


def test_support_recovery_identity_union_hadamard():
    """Tropp's ERC holds for k=4 < (1 + 1/μ)/2 with μ = 1/8: signed MP never leaves the support."""
    d = 64
    D = torch.cat([torch.eye(d), torch.tensor(hadamard(d), dtype=torch.float64) / 8]).double()
    g = torch.Generator().manual_seed(8)
    n = 4000
    support = torch.rand(n, 2 * d, generator=g).argsort(-1)[:, :4]
    signs = torch.randint(0, 2, (n, 4), generator=g).double() * 2 - 1
    mags = 0.5 + torch.rand(n, 4, generator=g, dtype=torch.float64)
    z = torch.zeros(n, 2 * d, dtype=torch.float64).scatter(1, support, signs * mags)
    x = z @ D
    res = matching_pursuit(x, D, 30, tol=1e-12)  # stop near round-off, not on noise atoms
    used = res.indices >= 0
    counts = torch.zeros(n, 2 * d, dtype=torch.float64)
    chosen = counts.scatter_add(1, res.indices.clamp(min=0), used.double()) > 0
    assert not (chosen & (z == 0)).any()
    assert (res.residual.norm(dim=-1) < 1e-3 * x.norm(dim=-1)).all()
    # every sign pattern on one fixed mixed support is recovered too
    for pattern in itertools.product([-1.0, 1.0], repeat=4):
        z1 = torch.zeros(1, 2 * d, dtype=torch.float64)
        z1[0, [3, 17, d + 5, d + 40]] = torch.tensor(pattern, dtype=torch.float64)
        r1 = matching_pursuit(z1 @ D, D, 30, tol=1e-12)
        assert set(r1.indices[0].tolist()) - {-1} <= {3, 17, d + 5, d + 40}


def test_stopping_rules_per_sample():
    x, D = problem(B=64, d=16, c=80, seed=10)
    res = matching_pursuit(x, D, 60, tol=0.05)
    energy = (res.residual**2).sum(-1)
    assert (energy <= 0.05 * (x**2).sum(-1) + 1e-12).all()
    steps = (res.indices >= 0).sum(-1)
    assert steps.min() < steps.max()  # adaptive per-sample L0
    fewer = matching_pursuit(x, D, 60, tol=0.2)
    assert ((fewer.indices >= 0).sum(-1) <= steps).all()
    sel = mp_select(x, D, 40, coef_threshold=0.3)
    assert (sel.coefficients[sel.active].abs() >= 0.3).all()
    budget = matching_pursuit(x, D, 40, max_l0=3)
    assert ((budget.codes != 0).sum(-1) <= 3).all()


def test_atom_mask_excludes_atoms():
    x, D = problem(seed=11)
    mask = torch.ones(40, dtype=torch.bool)
    mask[::2] = False
    res = matching_pursuit(x, D, 8, atom_mask=mask)
    assert (res.codes[:, ::2] == 0).all()


def test_omp_matches_sklearn_and_is_orthogonal():
    from sklearn.linear_model import orthogonal_mp

    x, D = problem(B=5, d=20, c=50, seed=12)
    res = orthogonal_matching_pursuit(x, D, 6)
    ref = orthogonal_mp(D.T.numpy(), x.T.numpy(), n_nonzero_coefs=6).T
    np.testing.assert_allclose(res.codes.numpy(), ref, atol=1e-10)
    S = D[res.indices]
    assert (torch.einsum("btd,bd->bt", S, res.residual).abs() < 1e-10).all()
    x.requires_grad_()
    out = orthogonal_matching_pursuit(x, D, 6)
    (g,) = torch.autograd.grad(out.residual.pow(2).sum(), x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must"),
        ({"tol": 1.5}, "tol"),
        ({"D": torch.randn(30, 7, dtype=torch.float64)}, "D has atoms"),
        ({"D": torch.randn(30, 8)}, "D .*must match x"),
        ({"x": torch.full((4, 8), float("nan"), dtype=torch.float64)}, "x contains NaN"),
        ({"method": "fast"}, "method"),
        ({"selector": torch.randn(3, 8, dtype=torch.float64)}, "selector"),
        ({"atom_mask": torch.ones(30)}, "atom_mask"),
    ],
)
def test_bad_input_raises_without_mutation(kwargs, match):
    g = torch.Generator().manual_seed(13)
    args = {
        "x": torch.randn(4, 8, generator=g, dtype=torch.float64),
        "D": torch.randn(30, 8, generator=g, dtype=torch.float64),
        "k": 3,
    }
    args.update(kwargs)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=match):
        matching_pursuit(**args)
    for k, v in before.items():
        assert torch.equal(args[k], v) or torch.isnan(v).all()
