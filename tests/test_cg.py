"""Batched CG: per-system stopping, exactness against dense solves, gradients, Lanczos."""

import warnings

import pytest
import torch

import probunroll as pu

DT = torch.float64


def spd_batch(batch, n, conds, generator):
    """SPD matrices Q diag(λ) Qᵀ with log-spaced spectra from 1 to each condition number."""
    Q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=DT, generator=generator))
    t = torch.linspace(0, 1, n, dtype=DT)
    ev = torch.exp(t[None, :] * torch.log(conds)[:, None])
    return Q @ torch.diag_embed(ev) @ Q.mT


@pytest.fixture(scope="module")
def systems():
    g = torch.Generator().manual_seed(0)
    conds = torch.logspace(1, 4, 64, dtype=DT)
    A = spd_batch(64, 128, conds, g)
    b = torch.randn(64, 128, dtype=DT, generator=g)
    return A, b


def test_every_system_meets_its_own_tolerance(systems):
    A, b = systems
    tol = 1e-8
    res = pu.linalg.cg(A, b, tol=tol, grad="none")
    true_res = torch.linalg.vector_norm(b - (A @ res.x[..., None])[..., 0], dim=-1)
    true_res = true_res / torch.linalg.vector_norm(b, dim=-1)
    assert bool(res.converged.all())
    assert float(true_res.max()) <= tol
    torch.testing.assert_close(res.residual, true_res, rtol=1e-6, atol=1e-14)
    x_dense = torch.linalg.solve(A, b)
    assert float((res.x - x_dense).abs().max()) <= 1e-6
    # per-system stopping: easy systems took far fewer steps than hard ones
    assert int(res.iterations[0]) < int(res.iterations[-1]) // 3
    assert int(res.iterations.max()) == res.steps


def test_a_tolerance_tensor_gives_each_system_its_own(systems):
    """``tol`` as a tensor: each system meets its own tolerance (true residual), a system with
    a looser one stops sooner than it would at the tightest, a constant tensor reproduces the
    scalar tolerance step for step, and bad tensors are refused before anything runs."""
    A, b = systems
    tols = torch.logspace(-3, -10, 64, dtype=DT)
    res = pu.linalg.cg(A, b, tol=tols, grad="none")
    true_res = torch.linalg.vector_norm(b - (A @ res.x[..., None])[..., 0], dim=-1)
    true_res = true_res / torch.linalg.vector_norm(b, dim=-1)
    assert bool(res.converged.all())
    assert bool((true_res <= tols).all())
    tight = pu.linalg.cg(A, b, tol=1e-10, grad="none")
    assert bool((res.iterations <= tight.iterations).all())
    assert int(res.iterations[0]) < int(tight.iterations[0]) // 2  # tol 1e-3 vs 1e-10
    const = pu.linalg.cg(A, b, tol=torch.full((64,), 1e-8, dtype=DT), grad="none")
    scalar = pu.linalg.cg(A, b, tol=1e-8, grad="none")
    assert torch.equal(const.iterations, scalar.iterations)
    torch.testing.assert_close(const.x, scalar.x, rtol=0, atol=0)
    missed = tols.clone()
    missed[5] = 1e-300  # below what 3 steps reach: that system alone is flagged, no crash
    with pytest.warns(pu.NumericalWarning, match="did not reach their tol"):
        few = pu.linalg.cg(A[:8], b[:8], tol=missed[:8], max_iters=3, grad="none")
    assert not bool(few.converged[5])
    before = b.clone()
    for bad, match in (
        (torch.full((3,), 1e-6, dtype=DT), "broadcast"),
        (torch.tensor([-1.0] * 64, dtype=DT), "finite values ≥ 0"),
        (torch.tensor([float("nan")] * 64, dtype=DT), "finite values ≥ 0"),
        (torch.ones(64, dtype=torch.int64), "real"),
    ):
        with pytest.raises(ValueError, match=match):
            pu.linalg.cg(A, b, tol=bad)
    assert torch.equal(b, before)


def test_system_alone_equals_system_in_hard_batch(systems):
    A, b = systems
    easy = 3
    alone = pu.linalg.cg(A[easy : easy + 1], b[easy : easy + 1], tol=1e-8)
    # the same system inside a batch of much harder ones
    idx = torch.tensor([easy, 60, 61, 62, 63])
    batched = pu.linalg.cg(A[idx], b[idx], tol=1e-8)
    assert float((alone.x[0] - batched.x[0]).abs().max()) <= 1e-10
    assert int(alone.iterations[0]) == int(batched.iterations[0])


def test_converged_systems_stop_updating():
    """A system that converges at step k keeps exactly its step-k iterate."""
    g = torch.Generator().manual_seed(1)
    A = spd_batch(2, 40, torch.tensor([2.0, 1e4], dtype=DT), g)
    b = torch.randn(2, 40, dtype=DT, generator=g)
    res = pu.linalg.cg(A, b, tol=1e-9)
    k = int(res.iterations[0])
    again = pu.linalg.cg(A, b, tol=None, max_iters=k)  # same batch, stopped at step k
    assert int(res.iterations[1]) > k + 20
    assert torch.equal(again.x[0], res.x[0])


def test_operator_callable_and_tensor_agree():
    g = torch.Generator().manual_seed(2)
    A = spd_batch(1, 30, torch.tensor([50.0], dtype=DT), g)[0]
    b = torch.randn(5, 30, dtype=DT, generator=g)
    r_tensor = pu.linalg.cg(A, b, tol=1e-12)
    r_call = pu.linalg.cg(lambda v: v @ A, b, tol=1e-12)
    torch.testing.assert_close(r_tensor.x, r_call.x, rtol=0, atol=1e-12)


def test_jacobi_preconditioner_and_warm_start():
    g = torch.Generator().manual_seed(3)
    C = spd_batch(8, 64, torch.full((8,), 5.0, dtype=DT), g)
    d = torch.logspace(0, 4, 64, dtype=DT)
    A = d.sqrt()[:, None] * C * d.sqrt()[None, :]  # badly scaled, well conditioned after Jacobi
    b = torch.randn(8, 64, dtype=DT, generator=g)
    plain = pu.linalg.cg(A, b, tol=1e-10, max_iters=2000)
    pre = pu.linalg.cg(A, b, M_inv=1 / torch.diagonal(A, dim1=-2, dim2=-1), tol=1e-10)
    x = torch.linalg.solve(A, b)
    assert float(((pre.x - x).norm(dim=-1) / x.norm(dim=-1)).max()) < 1e-6
    assert int(pre.iterations.max()) * 3 < int(plain.iterations.max())
    warm = pu.linalg.cg(A, b, M_inv=1 / torch.diagonal(A, dim1=-2, dim2=-1), tol=1e-10, x0=pre.x)
    assert int(warm.iterations.max()) <= 1


def test_zero_rhs_gives_zero_solution():
    A = torch.eye(4, dtype=DT) * 3
    b = torch.zeros(2, 4, dtype=DT)
    b[1, 0] = 3.0
    res = pu.linalg.cg(A, b, tol=1e-12, x0=torch.ones(2, 4, dtype=DT))
    assert torch.equal(res.x[0], torch.zeros(4, dtype=DT))
    torch.testing.assert_close(res.x[1], torch.tensor([1.0, 0, 0, 0], dtype=DT))
    assert bool(res.converged.all())


def test_nonconvergence_warns_with_count_and_worst_residual(systems):
    A, b = systems
    with pytest.warns(pu.NumericalWarning, match=r"\d+ of 64 systems did not reach tol=1e-10"):
        res = pu.linalg.cg(A, b, tol=1e-10, max_iters=40)
    assert not bool(res.converged.all())
    assert bool(res.converged[0])  # the κ=10 system converges within 40 steps


def test_fixed_iteration_count_does_not_warn(systems):
    A, b = systems
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = pu.linalg.cg(A[:4], b[:4], tol=None, max_iters=7)
    assert res.steps == 7
    assert torch.equal(res.iterations, torch.full((4,), 7))


def test_breakdown_raises_on_indefinite_matrix():
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=DT))
    with pytest.raises(pu.BreakdownError, match="not symmetric positive definite"):
        pu.linalg.cg(A, torch.ones(3, dtype=DT))


def test_float32_matches_float64(systems):
    A, b = systems
    r64 = pu.linalg.cg(A[:8], b[:8], tol=1e-10)
    r32 = pu.linalg.cg(A[:8].float(), b[:8].float(), tol=1e-4)
    assert r32.x.dtype == torch.float32
    rel = (r32.x.double() - r64.x).norm(dim=-1) / r64.x.norm(dim=-1)
    assert float(rel.max()) < 1e-2


# ---------------------------------------------------------------------------------- gradients


def _grad_problem():
    g = torch.Generator().manual_seed(4)
    n = 12
    L = torch.randn(n, n, dtype=DT, generator=g) / n**0.5
    d = torch.rand(n, dtype=DT, generator=g) + 0.5
    b = torch.randn(3, n, dtype=DT, generator=g)
    w = torch.randn(3, n, dtype=DT, generator=g)
    return L, d, b, w


def _loss_grads(solver, L, d, b, w):
    d = d.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    A = L @ L.T + torch.diag(d)
    loss = (w * solver(A, b)).sum() + (solver(A, b) ** 2).sum()
    return torch.autograd.grad(loss, (d, b))


@pytest.mark.parametrize(("grad", "tol"), [("implicit", 1e-8), ("unroll", 1e-6)])
def test_gradients_match_dense_solve(grad, tol):
    L, d, b, w = _grad_problem()
    dense = _loss_grads(lambda A, b: torch.linalg.solve(A, b.T).T, L, d, b, w)
    ours = _loss_grads(lambda A, b: pu.linalg.cg(A, b, tol=1e-13, grad=grad).x, L, d, b, w)
    for g_ours, g_dense in zip(ours, dense, strict=True):
        assert float((g_ours - g_dense).abs().max()) <= tol * float(g_dense.abs().max())


def test_implicit_gradient_through_callable_parameters():
    """The implicit mode differentiates parameters captured by a matvec closure."""
    L, d, b, w = _grad_problem()
    d = d.clone().requires_grad_(True)
    x = pu.linalg.cg(lambda v: v @ (L @ L.T) + d * v, b, tol=1e-13, grad="implicit").x
    (gd,) = torch.autograd.grad((w * x).sum(), d)
    d2 = d.detach().clone().requires_grad_(True)
    x2 = torch.linalg.solve(L @ L.T + torch.diag(d2), b.T).T
    (gd2,) = torch.autograd.grad((w * x2).sum(), d2)
    torch.testing.assert_close(gd, gd2, rtol=1e-8, atol=1e-12)


def test_no_grad_mode_builds_no_graph():
    L, d, b, _ = _grad_problem()
    d = d.clone().requires_grad_(True)
    x = pu.linalg.cg(L @ L.T + torch.diag(d), b, tol=1e-10, grad="none").x
    assert not x.requires_grad


@pytest.mark.parametrize("grad", ["implicit", "unroll"])
def test_gradcheck(grad):
    g = torch.Generator().manual_seed(5)
    n = 5
    L = torch.randn(n, n, dtype=DT, generator=g)
    d = (torch.rand(n, dtype=DT, generator=g) + 1).requires_grad_(True)
    b = torch.randn(2, n, dtype=DT, generator=g).requires_grad_(True)

    def f(d, b):
        A = L @ L.T / n + torch.diag(d)
        return pu.linalg.cg(A, b, tol=1e-14, grad=grad).x

    assert torch.autograd.gradcheck(f, (d, b), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ Lanczos


def test_lanczos_eigenvalues_from_cg_match_preconditioned_spectrum():
    """n CG steps at n=32 reproduce eig(M^-½ A M^-½) to 1e-8.

    A = M^{1/2} C M^{1/2} with a badly scaled diagonal M (1…100) and C well conditioned
    (κ ≈ 1.6): finite-precision Lanczos keeps its orthogonality for n steps only when the
    preconditioned matrix is well conditioned, which is the regime Jacobi preconditioning
    aims for.
    """
    g = torch.Generator().manual_seed(6)
    n = 32
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    ev = torch.logspace(0, 0.2, n, dtype=DT)
    C = Q @ torch.diag(ev) @ Q.T
    m = torch.logspace(0, 2, n, dtype=DT)[torch.randperm(n, generator=g)]
    A = m.sqrt()[:, None] * C * m.sqrt()[None, :]
    b = torch.randn(n, dtype=DT, generator=g)
    res = pu.linalg.cg(A, b, M_inv=1 / m, tol=None, max_iters=n, lanczos=True)
    assert int(res.lanczos.lengths) == n
    T = pu.linalg.lanczos_tridiagonal(res.lanczos)
    ms = m.rsqrt()
    expected = torch.linalg.eigvalsh(ms[:, None] * A * ms[None, :])
    assert float((torch.linalg.eigvalsh(T) - expected).abs().max()) <= 1e-8


def test_ritz_values_lie_in_the_spectrum_with_per_system_lengths(systems):
    A, b = systems
    res = pu.linalg.cg(A[::16], b[::16], tol=1e-6, lanczos=True)
    coeffs = res.lanczos
    assert torch.equal(coeffs.lengths, res.iterations)
    T = pu.linalg.lanczos_tridiagonal(coeffs)
    ev = torch.linalg.eigvalsh(A[::16])
    for i in range(T.shape[0]):
        L = int(coeffs.lengths[i])
        ritz = torch.linalg.eigvalsh(T[i, :L, :L])
        assert float(ritz.min()) >= float(ev[i].min()) * (1 - 1e-8)
        assert float(ritz.max()) <= float(ev[i].max()) * (1 + 1e-8)
        # padding past the length is decoupled from the leading block
        assert float(T[i, L - 1, L:].abs().sum()) == 0.0


# ---------------------------------------------------------------------------------- bad input


def _textbook_pcg_residuals(A, b, m_inv, x0, steps):
    """Plain preconditioned CG (Saad 2003, Alg. 9.1) on one system: the true residual
    ``b − A x_k`` after each of ``steps`` steps, shape (steps + 1, n)."""
    x = x0.clone()
    r = b - A @ x
    z = m_inv * r
    p = z.clone()
    out = [r.clone()]
    for _ in range(steps):
        Ap = A @ p
        a = (r @ z) / (p @ Ap)
        x = x + a * p
        r_new = r - a * Ap
        z_new = m_inv * r_new
        p = z_new + (r_new @ z_new) / (r @ z) * p
        r, z = r_new, z_new
        out.append(b - A @ x)
    return torch.stack(out)


def test_preconditioned_norm_stops_on_r_transpose_m_inverse_r(systems):
    """``norm="preconditioned"``: each system stops when ``√(rᵀM⁻¹r) ≤ tol·√(bᵀM⁻¹b)``
    (oracle: textbook PCG's true residuals, the step where that norm first meets it, ±1 step
    for rounding near the threshold), from 0 and from a warm start, and the true residual
    there meets it; the plain rule
    ``‖r‖ ≤ tol‖b‖`` matches its own oracle the same way; ``residual`` is in the chosen norm;
    without a preconditioner the two rules are one; an unknown norm is refused."""
    A, b = systems[0][:16], systems[1][:16]
    # a preconditioner unlike A's own scaling, so that the two norms disagree
    m_inv = torch.logspace(-0.5, 0.5, 128, dtype=DT).expand(16, 128)

    def m_norm(v, m=m_inv):
        return (v * m * v).sum(-1).sqrt()

    tol = 1e-3
    for x0 in (torch.zeros_like(b), 0.1 * torch.linalg.solve(A, b)):
        res = pu.linalg.cg(A, b, M_inv=m_inv, tol=tol, x0=x0, grad="none", norm="preconditioned")
        plain = pu.linalg.cg(A, b, M_inv=m_inv, tol=tol, x0=x0, grad="none")
        r = b - (A @ res.x[..., None])[..., 0]
        assert bool(res.converged.all())
        assert bool((m_norm(r) <= 1.0001 * tol * m_norm(b)).all())
        torch.testing.assert_close(res.residual, m_norm(r) / m_norm(b), rtol=1e-6, atol=0)
        for i in range(16):
            rs = _textbook_pcg_residuals(A[i], b[i], m_inv[i], x0[i], 160)
            by_m = m_norm(rs, m_inv[i]) <= tol * m_norm(b[i], m_inv[i])
            by_r = rs.norm(dim=-1) <= tol * b[i].norm()
            want_m, want_r = int(by_m.nonzero()[0]), int(by_r.nonzero()[0])
            assert abs(int(res.iterations[i]) - want_m) <= 1
            assert abs(int(plain.iterations[i]) - want_r) <= 1
    a = pu.linalg.cg(A, b, tol=tol, grad="none", norm="preconditioned")
    c = pu.linalg.cg(A, b, tol=tol, grad="none")
    assert torch.equal(a.iterations, c.iterations)
    with pytest.raises(ValueError, match="norm must be one of"):
        pu.linalg.cg(A, b, norm="energy")


def test_atol_stops_each_system_at_an_absolute_residual(systems):
    """``atol``: a system stops at ``‖r‖ ≤ max(tol·‖b‖, atol)`` in the chosen norm (oracle:
    textbook PCG's true residuals, the first step that meets it, ±1 step), per system as a
    tensor, from 0 and from a warm start; with ``tol`` as well the larger bound decides;
    ``residual`` stays relative to ``‖b‖`` and ``converged`` agrees with it; the implicit
    gradient's adjoint solve, at the relative equivalent, matches the dense one's."""
    A, b = systems[0][:12], systems[1][:12]
    m_inv = torch.logspace(-0.5, 0.5, 128, dtype=DT).expand(12, 128)
    b = b * torch.logspace(-3, 3, 12, dtype=DT)[:, None]  # ‖b‖ over six decades

    def m_norm(v, m):
        return (v * m * v).sum(-1).sqrt()

    atol = torch.full((12,), 1e-2, dtype=DT)
    atol[::3] = 1e-4
    x0s = (torch.zeros_like(b), 0.5 * torch.linalg.solve(A, b))
    for norm in ("residual", "preconditioned"):
        size = m_norm if norm == "preconditioned" else lambda v, m: v.norm(dim=-1)
        for x0, tol in zip(x0s, (None, 1e-3), strict=True):
            res = pu.linalg.cg(A, b, M_inv=m_inv, tol=tol, atol=atol, x0=x0, grad="none", norm=norm)
            assert bool(res.converged.all())
            r = b - (A @ res.x[..., None])[..., 0]
            goal = atol if tol is None else torch.maximum(tol * size(b, m_inv), atol)
            assert bool((size(r, m_inv) <= 1.0001 * goal).all())
            assert torch.allclose(res.residual, size(r, m_inv) / size(b, m_inv))
            for i in range(12):
                rs = _textbook_pcg_residuals(A[i], b[i], m_inv[i], x0[i], 300)
                want = int((size(rs, m_inv[i]) <= goal[i]).nonzero()[0])
                assert abs(int(res.iterations[i]) - want) <= 1, (norm, i)
    # a float atol is every system's (tol's default 1e-6 would decide where it is larger);
    # far too tight for the step cap: not converged, warned
    res = pu.linalg.cg(A, b, M_inv=m_inv, tol=None, atol=1e-3, grad="none")
    assert bool(res.converged.all())
    with pytest.warns(pu.NumericalWarning, match="their tolerance"):
        miss = pu.linalg.cg(A, b, tol=None, atol=1e-30, max_iters=5, grad="none")
    assert not bool(miss.converged.any())
    # implicit gradient with an absolute tolerance: the adjoint solve is accurate too
    Ag = A[:3].clone().requires_grad_(True)
    bg = b[:3].clone().requires_grad_(True)
    w = torch.randn(3, 128, dtype=DT, generator=torch.Generator().manual_seed(1))
    scale = b[:3].norm(dim=-1, keepdim=True)
    x = pu.linalg.cg(Ag, bg, tol=None, atol=1e-11 * scale[:, 0], grad="implicit").x
    ((x * w / scale).sum()).backward()
    Ad, bd = A[:3].clone().requires_grad_(True), b[:3].clone().requires_grad_(True)
    xd = torch.linalg.solve(Ad, bd)
    ((xd * w / scale).sum()).backward()
    assert torch.allclose(bg.grad, bd.grad, rtol=1e-6, atol=1e-12)
    assert torch.allclose(Ag.grad, Ad.grad, rtol=1e-6, atol=1e-12)


def test_bad_input_raises_value_error_naming_the_argument():
    A = torch.eye(4, dtype=DT)
    b = torch.ones(2, 4, dtype=DT)
    b_before = b.clone()
    with pytest.raises(ValueError, match="B contains NaN"):
        pu.linalg.cg(A, torch.tensor([1.0, float("nan"), 0, 0], dtype=DT))
    with pytest.raises(ValueError, match="systems have size 3"):
        pu.linalg.cg(A, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="A must be square"):
        pu.linalg.cg(torch.ones(4, 3, dtype=DT), b)
    with pytest.raises(ValueError, match=r"A has dtype torch\.float32"):
        pu.linalg.cg(A.float(), b)
    with pytest.raises(ValueError, match="x0 must have B's shape"):
        pu.linalg.cg(A, b, x0=torch.zeros(4, dtype=DT))
    with pytest.raises(ValueError, match="grad must be one of"):
        pu.linalg.cg(A, b, grad="backprop")
    with pytest.raises(ValueError, match="tol must be"):
        pu.linalg.cg(A, b, tol=-1.0)
    with pytest.raises(ValueError, match="atol must be"):
        pu.linalg.cg(A, b, atol=float("nan"))
    with pytest.raises(ValueError, match="atol must be"):
        pu.linalg.cg(A, b, atol=-1e-3)
    with pytest.raises(ValueError, match="an atol tensor must broadcast"):
        pu.linalg.cg(A, b, atol=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="an atol tensor must hold finite values"):
        pu.linalg.cg(A, b, atol=torch.tensor([1.0, -1.0], dtype=DT))
    with pytest.raises(ValueError, match="M_inv"):
        pu.linalg.cg(A, b, M_inv=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="B must be a real floating"):
        pu.linalg.cg(A, torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch shape"):
        pu.linalg.cg(torch.eye(4, dtype=DT).expand(3, 4, 4), torch.ones(2, 4, dtype=DT))
    assert torch.equal(b, b_before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(systems):
    A, b = systems
    cpu = pu.linalg.cg(A[:8], b[:8], tol=1e-10)
    gpu = pu.linalg.cg(A[:8].cuda(), b[:8].cuda(), tol=1e-10)
    assert gpu.x.device.type == "cuda"
    torch.testing.assert_close(gpu.x.cpu(), cpu.x, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="cuda"):
        pu.linalg.cg(A[:8].cuda(), b[:8])


def test_checkpointed_unrolling_matches_plain_unrolling():
    """checkpoint_every recomputes segments in backward: same values and gradients."""
    L, d, b, w = _grad_problem()

    def run(**kw):
        dd = d.clone().requires_grad_(True)
        res = pu.linalg.cg(L @ L.T + torch.diag(dd), b, tol=None, max_iters=9, lanczos=True, **kw)
        (g,) = torch.autograd.grad((w * res.x).sum(), dd)
        return res, g

    plain, g_plain = run()
    ckpt, g_ckpt = run(checkpoint_every=4)
    torch.testing.assert_close(ckpt.x, plain.x, rtol=0, atol=1e-14)
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-12, atol=1e-14)
    assert torch.equal(ckpt.iterations, plain.iterations)
    torch.testing.assert_close(ckpt.lanczos.alphas, plain.lanczos.alphas, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="checkpoint_every"):
        pu.linalg.cg(L @ L.T + torch.diag(d), b, checkpoint_every=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unrolled_gradient_stays_finite_far_past_convergence(dtype):
    """A fixed-step run 25x longer than convergence needs: no NaN in backward (regression:
    backward through a = rᵀz/pᵀAp squared pᵀAp once ‖r‖ reached ~√tiny)."""
    g = torch.Generator().manual_seed(7)
    L = torch.randn(8, 8, dtype=dtype, generator=g)
    d = (torch.rand(8, dtype=dtype, generator=g) + 0.5).requires_grad_(True)
    b = torch.randn(3, 8, dtype=dtype, generator=g)
    x = pu.linalg.cg(L @ L.T / 8 + torch.diag(d), b, tol=None, max_iters=200).x
    (gd,) = torch.autograd.grad(x.sum(), d)
    d2 = d.detach().clone().requires_grad_(True)
    xe = torch.linalg.solve(L @ L.T / 8 + torch.diag(d2), b.T).T
    (gd2,) = torch.autograd.grad(xe.sum(), d2)
    assert bool(torch.isfinite(gd).all())
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    assert float((gd - gd2).abs().max()) <= tol * float(gd2.abs().max())


@pytest.mark.parametrize("precondition", [False, True])
def test_in_place_no_grad_path_never_mutates_inputs(precondition):
    """grad="none" updates x, r, p in place: B, x0 and M_inv must stay untouched."""
    g = torch.Generator().manual_seed(8)
    A = spd_batch(3, 20, torch.tensor([10.0, 50.0, 100.0], dtype=DT), g)
    B = torch.randn(3, 20, dtype=DT, generator=g)
    x0 = torch.randn(3, 20, dtype=DT, generator=g)
    M_inv = 1 / torch.diagonal(A, dim1=-2, dim2=-1) if precondition else None
    before = [t.clone() for t in (A, B, x0) + ((M_inv,) if precondition else ())]
    for start in (None, x0):
        res = pu.linalg.cg(A, B, M_inv, tol=1e-10, x0=start, grad="none")
        torch.testing.assert_close(res.x, torch.linalg.solve(A, B), rtol=1e-8, atol=1e-10)
    after = (A, B, x0) + ((M_inv,) if precondition else ())
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b)
