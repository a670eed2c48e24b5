"""Sparsemax, simplex projection and thresholds against independent oracles."""

import numpy as np
import pytest
import torch

from probunroll.linalg import hard_threshold, project_simplex, soft_threshold, sparsemax


def bisection_projection(v: np.ndarray, radius: float = 1.0) -> np.ndarray:
    """Oracle: find τ with Σ max(v − τ, 0) = radius by bisection (no sorting)."""
    lo, hi = v.min() - radius, v.max()
    for _ in range(200):
        tau = (lo + hi) / 2
        if np.maximum(v - tau, 0).sum() > radius:
            lo = tau
        else:
            hi = tau
    return np.maximum(v - (lo + hi) / 2, 0)


def test_sparsemax_matches_bisection_oracle():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 17, generator=g, dtype=torch.float64) * 3
    z = sparsemax(v)
    oracle = np.stack([bisection_projection(row) for row in v.numpy()])
    np.testing.assert_allclose(z.numpy(), oracle, atol=1e-10)
    assert (z >= 0).all()
    torch.testing.assert_close(z.sum(-1), torch.ones(50, dtype=torch.float64))


def test_sparsemax_dim_and_shift_invariance():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 9, 3, generator=g, dtype=torch.float64)
    z = sparsemax(v, dim=1)
    torch.testing.assert_close(z, sparsemax(v.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(z, sparsemax(v + 7.5, dim=1))


def test_sparsemax_gradcheck_and_formula():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sparsemax, (v,))
    z = sparsemax(v)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((z * w).sum(), v)
    s = (z > 0).double()
    expected = s * (w - (w * s).sum(-1, keepdim=True) / s.sum(-1, keepdim=True))
    torch.testing.assert_close(grad, expected)


def test_project_simplex_radius_and_float32():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(20, 11, generator=g, dtype=torch.float64)
    p = project_simplex(v, radius=2.5)
    oracle = np.stack([bisection_projection(row, 2.5) for row in v.numpy()])
    np.testing.assert_allclose(p.numpy(), oracle, atol=1e-10)
    p32 = project_simplex(v.float(), radius=2.5)
    torch.testing.assert_close(p32.double(), p, atol=1e-5, rtol=0)
    # points already on the simplex are fixed points
    torch.testing.assert_close(project_simplex(sparsemax(v)), sparsemax(v))


def test_thresholds_match_numpy():
    x = torch.linspace(-2, 2, 41, dtype=torch.float64)
    t = 0.7
    xn = x.numpy()
    np.testing.assert_allclose(
        soft_threshold(x, t).numpy(), np.sign(xn) * np.maximum(np.abs(xn) - t, 0)
    )
    np.testing.assert_allclose(hard_threshold(x, t).numpy(), np.where(np.abs(xn) > t, xn, 0))
    tt = torch.full((41,), 0.7, dtype=torch.float64)
    torch.testing.assert_close(soft_threshold(x, tt), soft_threshold(x, t))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda v: sparsemax(v.clone().fill_(float("nan"))), "NaN"),
        (lambda v: sparsemax(v, dim=3), "dim"),
        (lambda v: sparsemax(v.long()), "floating"),
        (lambda v: project_simplex(v, radius=0.0), "radius"),
        (lambda v: soft_threshold(v, -1.0), "threshold"),
        (lambda v: hard_threshold(v, torch.ones(3, 5)), "threshold"),
    ],
)
def test_bad_input_raises_without_mutation(call, match):
    v = torch.randn(4, 6)
    before = v.clone()
    with pytest.raises(ValueError, match=match):
        call(v)
    torch.testing.assert_close(v, before)
