"""Metrics against sklearn, scipy and brute-force oracles."""

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

from probunroll.sae import metrics


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_explained_variance_equals_sklearn():
    x = rand(100, 7) * torch.arange(1, 8) + 3.0  # features with different means and scales
    x_hat = x + 0.3 * rand(100, 7, seed=1)
    ours = float(metrics.explained_variance(x, x_hat))
    ref = r2_score(x.numpy(), x_hat.numpy(), multioutput="variance_weighted")
    assert abs(ours - ref) < 1e-12


def test_l0_and_dead_fraction_against_loops():
    z = torch.relu(rand(50, 20)) * (rand(50, 20, seed=2) > 0.5)
    z[:, 3] = 0
    z[0, 5] = -1.0  # negative codes count as active
    loop_l0 = sum(sum(1 for v in row if v != 0) for row in z.tolist()) / 50
    assert float(metrics.l0(z)) == pytest.approx(loop_l0)
    dead = sum(all(z[i, j] == 0 for i in range(50)) for j in range(20)) / 20
    assert float(metrics.dead_fraction(z)) == pytest.approx(dead)


def test_stability_permutation_symmetry_and_random_baseline():
    D = rand(30, 16)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    assert metrics.stability(D, D[perm] * 2.0) == pytest.approx(1.0)
    E = rand(30, 16, seed=4)
    assert metrics.stability(D, E) == pytest.approx(metrics.stability(E, D))
    c, d = 256, 64
    s = metrics.stability(rand(c, d, seed=5), rand(c, d, seed=6), absolute=True)
    assert s < math.sqrt(2 * math.log(c) / d)  # matched, so below the best-|cos| scale
    assert s > 0.1


def brute_force_mcc(learned, true):
    A = learned / learned.norm(dim=-1, keepdim=True)
    B = true / true.norm(dim=-1, keepdim=True)
    cos = (B @ A.T).abs().numpy()
    best = 0.0
    for cols in itertools.permutations(range(A.shape[0]), B.shape[0]):
        best = max(best, cos[np.arange(B.shape[0]), list(cols)].mean())
    return best


def test_mcc_equals_brute_force_and_sign_invariant():
    learned, true = rand(6, 5, seed=7), rand(4, 5, seed=8)
    assert metrics.mcc(learned, true) == pytest.approx(brute_force_mcc(learned, true))
    flips = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)[:, None]
    assert metrics.mcc(learned * flips, true) == pytest.approx(metrics.mcc(learned, true))
    assert metrics.mcc(torch.cat([true, rand(2, 5)]), true) == pytest.approx(1.0)


def test_coherence_against_loop():
    D = rand(10, 6, seed=9)
    Dn = D / D.norm(dim=-1, keepdim=True)
    per = [max(abs(float(Dn[i] @ Dn[j])) for j in range(10) if j != i) for i in range(10)]
    assert metrics.coherence(D) == pytest.approx(max(per))
    assert metrics.coherence(D, "mean") == pytest.approx(sum(per) / 10)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: metrics.explained_variance(rand(5, 3), rand(5, 4)), "differ in shape"),
        (lambda: metrics.mcc(rand(2, 3), rand(4, 3)), "fewer than"),
        (lambda: metrics.stability(rand(2, 3), rand(2, 4)), "dimensions"),
        (lambda: metrics.coherence(rand(5, 3), reduce="median"), "reduce"),
        (lambda: metrics.l0(rand(5)), "codes"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
