"""Probe estimators: SLQ log-determinants, diagonal of the inverse, perturb-and-solve samples."""

import numpy as np
import pytest
import scipy.fft
import torch

import probunroll as pu

DT = torch.float64


def masked_dct_precision(n, observed_fraction, alpha, beta, generator):
    """A = β Cᵀ diag(ω) C + diag(α) for the orthonormal DCT-II matrix C and a random mask ω.

    Returns the dense matrix (the oracle), a matvec that never forms it, and diag(A).
    """
    C = torch.from_numpy(scipy.fft.dct(np.eye(n), norm="ortho", axis=0))
    omega = (torch.rand(n, dtype=DT, generator=generator) < observed_fraction).to(DT)
    A = beta * C.T @ (omega[:, None] * C) + torch.diag(alpha)

    def matvec(v):
        return beta * (omega * (v @ C.T)) @ C + alpha * v

    return A, matvec, torch.diagonal(A).clone()


def sparse_alpha(n, active_fraction, generator, small=1.0, large=1e6):
    alpha = torch.full((n,), large, dtype=DT)
    active = torch.randperm(n, generator=generator)[: int(active_fraction * n)]
    alpha[active] = small
    return alpha


@pytest.fixture(scope="module")
def sbl_512():
    g = torch.Generator().manual_seed(10)
    n = 512
    alpha = sparse_alpha(n, 0.05, g)
    A, matvec, diag = masked_dct_precision(n, 0.5, alpha, 400.0, g)
    return A, matvec, diag


def test_slq_logdet_masked_dct_sbl(sbl_512):
    A, matvec, diag = sbl_512
    truth = float(torch.logdet(A))
    g = torch.Generator().manual_seed(11)
    one = pu.linalg.slq_logdet(matvec, 512, num_probes=15, M_diag=diag, generator=g)
    assert abs(float(one) - truth) <= 3.0
    # 20 independent runs in one batched call: the probes carry a batch dimension of 20.
    runs = pu.linalg.slq_logdet(
        matvec, 512, num_probes=15, M_diag=diag.expand(20, 512), generator=g
    )
    assert runs.shape == (20,)
    assert abs(float(runs.mean()) - truth) <= 0.3
    assert float((runs - truth).abs().max()) <= 5.0


def test_slq_logdet_dense_initialisation_is_unbiased():
    """α = 1 (EM initialisation): large spread, but the mean is within 4 sd/√R of the truth."""
    g = torch.Generator().manual_seed(12)
    n = 256
    A, matvec, diag = masked_dct_precision(n, 0.5, torch.ones(n, dtype=DT), 400.0, g)
    truth = float(torch.logdet(A))
    R = 20
    runs = pu.linalg.slq_logdet(matvec, n, num_probes=15, M_diag=diag.expand(R, n), generator=g)
    sd = float(runs.std())
    assert abs(float(runs.mean()) - truth) <= 4 * sd / R**0.5


def test_slq_no_nan_when_some_systems_converge_early():
    """A batch mixing trivially easy (A = cI: one CG step) and hard systems stays finite."""
    g = torch.Generator().manual_seed(13)
    n = 128
    alphas = torch.stack(
        [
            torch.full((n,), 5.0, dtype=DT),
            sparse_alpha(n, 0.05, g),
            torch.logspace(-2, 6, n, dtype=DT),
        ]
    )
    C = torch.from_numpy(scipy.fft.dct(np.eye(n), norm="ortho", axis=0))
    omega = torch.stack(
        [
            torch.ones(n, dtype=DT),
            (torch.rand(n, generator=g) < 0.3).to(DT),
            (torch.rand(n, generator=g) < 0.6).to(DT),
        ]
    )
    beta = 100.0
    A = beta * C.T @ (omega[:, :, None] * C) + torch.diag_embed(alphas)
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    est = pu.linalg.slq_logdet(A, n, num_probes=10, M_diag=diag, generator=g, tol=1e-10)
    assert bool(torch.isfinite(est).all())
    truth = torch.logdet(A)
    assert abs(float(est[0] - truth[0])) <= 1e-8  # A = 105·I: exact after one step
    assert float((est - truth).abs().max()) <= 10.0


def test_diag_inverse_is_unbiased_with_the_predicted_variance():
    """D=256, N=128 Gaussian Φ, α log-normal(0, 2), β=100: standardised errors ~ (0, 1)."""
    g = torch.Generator().manual_seed(14)
    D, N, K, R = 256, 128, 10, 200
    Phi = torch.randn(N, D, dtype=DT, generator=g) / N**0.5
    alpha = torch.exp(2 * torch.randn(D, dtype=DT, generator=g))
    A = 100.0 * Phi.T @ Phi + torch.diag(alpha)
    Sigma = torch.linalg.inv(A)
    diag_true = torch.diagonal(Sigma)
    off = Sigma**2
    var = (off.sum(0) - torch.diagonal(off)) / K  # (1/K) Σ_{i≠j} Σ_ij²
    # plain probes (rotate=False): Jacobi only accelerates the solves, the estimator is z⊙A⁻¹z
    kw = dict(M_diag=torch.diagonal(A), rotate=False, generator=g, tol=1e-10)
    est = pu.linalg.diag_inverse(A, D, num_probes=K, batch_shape=(R,), **kw)
    assert est.shape == (R, D)
    z = (est - diag_true) / var.sqrt()
    assert abs(float(z.mean())) < 0.1
    assert 0.7 < float(z.var()) < 1.3
    # median relative error shrinks like 1/√K
    many = pu.linalg.diag_inverse(A, D, num_probes=1000, **kw)
    assert float(((many - diag_true).abs() / diag_true).median()) <= 0.06


def test_rotated_probes_cut_spread_on_pruned_coordinates(sbl_512):
    A, matvec, diag = sbl_512
    diag_true = torch.diagonal(torch.linalg.inv(A))
    pruned = diag > 1e5
    R = 40
    g = torch.Generator().manual_seed(15)
    kwargs = dict(num_probes=15, M_diag=diag.expand(R, 512), generator=g, tol=1e-10)
    plain = pu.linalg.diag_inverse(matvec, 512, rotate=False, **kwargs)
    rotated = pu.linalg.diag_inverse(matvec, 512, rotate=True, **kwargs)
    rel_sd_plain = ((plain - diag_true) / diag_true)[:, pruned].std()
    rel_sd_rot = ((rotated - diag_true) / diag_true)[:, pruned].std()
    assert float(rel_sd_rot) * 10 <= float(rel_sd_plain)
    # both stay unbiased on the active coordinates
    active = ~pruned
    for est in (plain, rotated):
        rel = ((est - diag_true) / diag_true)[:, active]
        assert abs(float(rel.mean())) < 4 * float(rel.std()) / (R * int(active.sum())) ** 0.5 + 1e-3


def test_probe_solve_returns_mean_diag_logdet_from_one_solve(sbl_512):
    A, matvec, diag = sbl_512
    g = torch.Generator().manual_seed(16)
    b = torch.randn(512, dtype=DT, generator=g)
    res = pu.linalg.probe_solve(matvec, b, 8, M_diag=diag, generator=g, tol=1e-10, logdet=True)
    torch.testing.assert_close(res.mean, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-9)
    assert res.x.shape == (9, 512) and res.probes.shape == (8, 512)
    assert res.logdet is not None and abs(float(res.logdet - torch.logdet(A))) < 5
    # warm start from the previous solutions with the same probes: converged at once
    again = pu.linalg.probe_solve(matvec, b, M_diag=diag, probes=res.probes, x0=res.x, tol=1e-8)
    assert int(again.cg.iterations.max()) <= 1
    torch.testing.assert_close(again.diag, res.diag, rtol=1e-6, atol=1e-12)


def test_common_probes_broadcast_across_a_cluster_dimension():
    g = torch.Generator().manual_seed(17)
    n, C, T = 64, 3, 5
    alpha = torch.rand(C, 1, n, dtype=DT, generator=g) + 0.5
    A = torch.diag_embed(alpha.expand(C, T, n))
    probes = pu.linalg.rademacher((4, 1, T, n), generator=g)
    res = pu.linalg.probe_solve(A, torch.zeros(C, T, n, dtype=DT), probes=probes, tol=1e-12)
    assert res.probes.shape == (4, C, T, n)
    assert torch.equal(res.probes[:, 0], res.probes[:, 2])
    torch.testing.assert_close(res.diag, 1 / alpha.expand(C, T, n))  # exact for diagonal A


def test_perturb_and_solve_samples_have_covariance_inverse_a():
    g = torch.Generator().manual_seed(18)
    D, N, K = 16, 12, 200_000
    Phi = torch.randn(N, D, dtype=DT, generator=g) / N**0.5
    alpha = torch.rand(D, dtype=DT, generator=g) + 0.2
    beta = 4.0
    mask = (torch.rand(N, generator=g) < 0.75).to(DT)
    A = torch.diag(alpha) + beta * Phi.T @ (mask[:, None] * Phi)
    eps = pu.linalg.gaussian_perturbation(alpha, Phi, beta, K, mask=mask, generator=g)
    assert eps.shape == (K, D)
    cov_eps = eps.T @ eps / K
    assert float(torch.linalg.norm(cov_eps - A) / torch.linalg.norm(A)) <= 0.02
    b = torch.randn(D, dtype=DT, generator=g)
    mean, samples, _res = pu.linalg.perturb_and_solve(A, b, eps, tol=1e-12)
    torch.testing.assert_close(mean, torch.linalg.solve(A, b))
    Sigma = torch.linalg.inv(A)
    cov = samples.T @ samples / K
    assert float(torch.linalg.norm(cov - Sigma) / torch.linalg.norm(Sigma)) <= 0.02


def test_probe_estimators_reject_bad_input():
    A = torch.eye(4, dtype=DT)
    with pytest.raises(ValueError, match="M_diag must be"):
        pu.linalg.slq_logdet(A, 4, M_diag=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="M_diag must be finite and positive"):
        pu.linalg.diag_inverse(A, 4, M_diag=-torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="num_probes"):
        pu.linalg.diag_inverse(A, 4, num_probes=0)
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        pu.linalg.gaussian_perturbation(torch.zeros(4, dtype=DT), A, 1.0, 3)
    with pytest.raises(ValueError, match="noise_precision must be positive"):
        pu.linalg.gaussian_perturbation(torch.ones(4, dtype=DT), A, -1.0, 3)
    with pytest.raises(ValueError, match="x0 must be zero on the probe systems"):
        pu.linalg.probe_solve(
            A, torch.ones(4, dtype=DT), 2, logdet=True, x0=torch.ones(3, 4, dtype=DT)
        )
    with pytest.raises(ValueError, match="rotate"):
        pu.linalg.probe_solve(
            A, torch.ones(4, dtype=DT), M_diag=torch.ones(4, dtype=DT), rotate=False, logdet=True
        )
