"""Tests of probunroll.operators: adjoints, exact masked Gram diagonals, references, batching,
dtypes, autograd, validation (reference/unrolling.md §F.1 and the defects of §E)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.fft
import scipy.sparse
import scipy.sparse.linalg
import torch

import probunroll.operators as ops
from probunroll.operators import (
    DCT,
    Compose,
    Convolution,
    Dense,
    Diagonal,
    Fourier,
    LinearOperator,
    LinearOperatorAdapter,
    Masked,
    RealView,
    ScipyLinearOperator,
    SparseMatrix,
    as_operator,
)

F64 = torch.float64
SIZES = (31, 64)


# --------------------------------------------------------------------------------------------
# random data and the operator zoo


def _randn(g: torch.Generator, *shape: int, complex: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=g, dtype=F64)
    return torch.complex(x, torch.randn(*shape, generator=g, dtype=F64)) if complex else x


def _bernoulli(g: torch.Generator, *shape: int, p: float = 0.6) -> torch.Tensor:
    return (torch.rand(*shape, generator=g, dtype=F64) < p).to(F64)


def _lo_dense(M: torch.Tensor):
    with warnings.catch_warnings():  # linear_operator's import-time deprecation noise
        warnings.simplefilter("ignore", DeprecationWarning)
        from linear_operator.operators import DenseLinearOperator
    return DenseLinearOperator(M)


def _sparse(g: torch.Generator, m: int, n: int, complex: bool = False) -> SparseMatrix:
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    if complex:
        M = _randn(g, m, n, complex=True) * _bernoulli(g, m, n, p=0.2)
        return SparseMatrix(M.to_sparse())
    return SparseMatrix(scipy.sparse.random(m, n, density=0.2, format="csr", random_state=seed))


def _scipy_lo(M: torch.Tensor, block: int = 256) -> ScipyLinearOperator:
    """A scipy LinearOperator given only by matvec/rmatvec callbacks (no matrix attribute)."""
    A = M.numpy()
    lo = scipy.sparse.linalg.LinearOperator(
        A.shape, matvec=lambda v: A @ v, rmatvec=lambda v: A.conj().T @ v, dtype=A.dtype
    )
    return ScipyLinearOperator(lo, block=block)


CASES = {
    "dense": lambda n, g: Dense(_randn(g, n // 2 + 3, n)),
    "dense_complex": lambda n, g: Dense(_randn(g, n + 2, n, complex=True)),
    "dense_batched": lambda n, g: Dense(_randn(g, 3, n - 4, n)),
    "dense_T": lambda n, g: Dense(_randn(g, n // 2 + 3, n)).T,
    "diagonal": lambda n, g: Diagonal(_randn(g, n)),
    "diagonal_complex": lambda n, g: Diagonal(_randn(g, n, complex=True)),
    "masked": lambda n, g: Masked(_bernoulli(g, n)),
    "masked_batched": lambda n, g: Masked(_bernoulli(g, 3, n)),
    "masked_bool": lambda n, g: Masked(_bernoulli(g, n).bool()),
    "dct": lambda n, g: DCT(n),
    "dct_T": lambda n, g: DCT(n).T,
    "fourier": lambda n, g: Fourier(n),
    "fourier_T": lambda n, g: Fourier(n).T,
    "realview_fourier": lambda n, g: RealView(Fourier(n)),
    "realview_fourier_T": lambda n, g: RealView(Fourier(n)).T,
    "realview_dense": lambda n, g: RealView(Dense(_randn(g, n - 3, n, complex=True))),
    "conv_full": lambda n, g: Convolution(_randn(g, 5), n, "full"),
    "conv_same": lambda n, g: Convolution(_randn(g, 6), n, "same"),
    "conv_causal": lambda n, g: Convolution(_randn(g, 7), n, "causal"),
    "conv_circular": lambda n, g: Convolution(_randn(g, 5), n, "circular"),
    "conv_long_full": lambda n, g: Convolution(_randn(g, n + 3), n, "full"),
    "conv_long_causal": lambda n, g: Convolution(_randn(g, n + 3), n, "causal"),
    "conv_batched": lambda n, g: Convolution(_randn(g, 3, 4), n, "same"),
    "conv_T": lambda n, g: Convolution(_randn(g, 5), n, "causal").T,
    "compose_masked_dct": lambda n, g: Compose(Masked(_bernoulli(g, n)), DCT(n)),
    "compose_masked_dct_T": lambda n, g: Compose(Masked(_bernoulli(g, n)), DCT(n)).T,
    "compose_chain": lambda n, g: Masked(_bernoulli(g, n)) @ DCT(n) @ Diagonal(_randn(g, n)),
    "compose_masked_fourier_batched": lambda n, g: Compose(Masked(_bernoulli(g, 3, n)), Fourier(n)),
    "compose_masked_realview": lambda n, g: Compose(
        Masked(_bernoulli(g, 2 * n)), RealView(Fourier(n))
    ),
    "compose_masked_conv": lambda n, g: Compose(
        Masked(_bernoulli(g, n)), Convolution(_randn(g, 5), n, "causal")
    ),
    "compose_reassociate": lambda n, g: Compose(
        Compose(Masked(_bernoulli(g, n)), DCT(n)), Dense(_randn(g, n, n - 2))
    ),
    "compose_dense_conv": lambda n, g: Compose(
        Dense(_randn(g, n // 2, n + 4)), Convolution(_randn(g, 5), n, "full")
    ),
    "sparse": lambda n, g: _sparse(g, n + 1, n),
    "sparse_complex": lambda n, g: _sparse(g, n - 1, n, complex=True),
    "sparse_T": lambda n, g: _sparse(g, n + 1, n).T,
    "adapter": lambda n, g: LinearOperatorAdapter(_lo_dense(_randn(g, n - 2, n))),
    "adapter_batched": lambda n, g: LinearOperatorAdapter(_lo_dense(_randn(g, 3, n, n))),
    "scipy_lo": lambda n, g: _scipy_lo(_randn(g, n - 5, n), block=7),
    "scipy_lo_complex": lambda n, g: _scipy_lo(_randn(g, n + 1, n, complex=True)),
    "scipy_lo_T": lambda n, g: _scipy_lo(_randn(g, n // 2, n), block=4).T,
}

# Operators whose Gram diagonal has a structured (FFT / elementwise) path: it must never
# materialise the matrix.
STRUCTURED = [
    "diagonal",
    "masked_batched",
    "dct",
    "dct_T",
    "fourier",
    "fourier_T",
    "realview_fourier",
    "conv_full",
    "conv_same",
    "conv_causal",
    "conv_circular",
    "conv_long_causal",
    "conv_batched",
    "conv_T",
    "compose_masked_dct",
    "compose_masked_dct_T",
    "compose_chain",
    "compose_masked_fourier_batched",
    "compose_masked_realview",
    "compose_masked_conv",
]


def _make(name: str, n: int, seed: int = 0) -> tuple[LinearOperator, torch.Generator]:
    """The operator in float64 (parameter-free ones such as DCT otherwise default to torch's
    default dtype for ``to_dense()`` and ``gram_diagonal(None)``)."""
    g = torch.Generator().manual_seed(seed)
    return CASES[name](n, g).to(dtype=F64), g


def _input(op: LinearOperator, g: torch.Generator, lead: tuple[int, ...] = (2,)) -> torch.Tensor:
    return _randn(g, *lead, *op.batch_shape, op.shape[1], complex=op.is_complex)


def _output(op: LinearOperator, g: torch.Generator, lead: tuple[int, ...] = (2,)) -> torch.Tensor:
    return _randn(g, *lead, *op.batch_shape, op.shape[0], complex=op.is_complex)


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ = Σ a conj(b), complex where either side is."""
    if a.is_complex() or b.is_complex():
        return (a * b.conj()).sum()
    return (a * b).sum()


def _dense_gram(A: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    A2 = A.abs() ** 2
    if mask is None:
        return A2.sum(-2)
    return (mask.unsqueeze(-1) * A2).sum(-2)


def _apply_dense(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if A.is_complex() and not x.is_complex():
        x = x.to(A.dtype)
    if x.is_complex() and not A.is_complex():
        A = A.to(x.dtype)
    return (A @ x.unsqueeze(-1)).squeeze(-1)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    scale = max(float(expected.abs().max()), 1e-300)
    err = float((got - expected).abs().max())
    assert err <= rtol * scale, f"max error {err:.3e} vs scale {scale:.3e}"


# --------------------------------------------------------------------------------------------
# 1. adjoint identity


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_adjoint_identity(name: str, n: int, masked: bool) -> None:
    op, g = _make(name, n)
    if masked:
        op = Compose(Masked(_bernoulli(g, op.shape[0])), op)
    x, y = _input(op, g), _output(op, g)
    Ax, AHy = op(x), op.T(y)
    assert Ax.shape == y.shape and AHy.shape == x.shape
    gap = abs(complex(_inner(Ax, y)) - complex(_inner(x, AHy)))
    assert gap <= 1e-10 * float(x.norm() * y.norm())


@pytest.mark.parametrize("name", list(CASES))
def test_adjoint_of_adjoint_is_the_operator(name: str) -> None:
    op, _ = _make(name, 31)
    assert op.T.T is op
    assert op.T.shape == (op.shape[1], op.shape[0])
    _assert_close(op.T.to_dense(), op.to_dense().mH, 1e-12)


# --------------------------------------------------------------------------------------------
# 2. exact masked Gram diagonals


MASKS = {
    "none": lambda m, g: None,
    "binary": lambda m, g: _bernoulli(g, m, p=0.3),
    "batched": lambda m, g: _bernoulli(g, 3, m, p=0.5),
    "weights": lambda m, g: _randn(g, m),
    "batched_weights": lambda m, g: torch.rand(3, m, generator=g, dtype=F64) * 5,
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_gram_diagonal_matches_dense(name: str, n: int, mask_kind: str) -> None:
    op, g = _make(name, n)
    mask = MASKS[mask_kind](op.shape[0], g)
    got = op.gram_diagonal(mask)
    expected = _dense_gram(op.to_dense(), mask)
    if mask is None:
        assert got.shape == (*op.batch_shape, op.shape[1])
    assert not got.is_complex()
    _assert_close(got, expected, 1e-12)


@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_gram_diagonal_never_materialises(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    op, g = _make(name, 64)
    mask = _bernoulli(g, 2, 1, op.shape[0])  # (2, 1, n_out): broadcasts against batch dims
    expected = _dense_gram(op.to_dense(), mask)

    def forbidden(*args, **kwargs):
        raise AssertionError("to_dense called by a structured gram_diagonal")

    for cls in (LinearOperator, ops._Adjoint, RealView):
        monkeypatch.setattr(cls, "to_dense", forbidden)
    _assert_close(op.gram_diagonal(mask), expected, 1e-12)


def test_gram_diagonal_of_unmasked_orthonormal_transforms_is_one() -> None:
    for op in (DCT(31), DCT(64), Fourier(31), DCT(64).T, RealView(Fourier(31))):
        # (RealView: cos² + sin² of each frequency's real and imaginary rows sums to 1.)
        _assert_close(op.to(dtype=F64).gram_diagonal(), torch.ones(op.shape[1], dtype=F64), 1e-13)
        assert op.gram_diagonal().dtype == torch.get_default_dtype()


def test_masked_gram_diagonal_formula() -> None:
    g = torch.Generator().manual_seed(1)
    m, w = _randn(g, 3, 9), _randn(g, 3, 9)
    _assert_close(Masked(m).gram_diagonal(w), m.square() * w, 0)


# --------------------------------------------------------------------------------------------
# 3. to_dense and reference implementations


@pytest.mark.parametrize("name", list(CASES))
def test_to_dense_matches_columnwise_application(name: str) -> None:
    op, _ = _make(name, 31)
    n_in = op.shape[1]
    eye = torch.eye(n_in, dtype=F64)
    columns = torch.stack([op(eye[j]) for j in range(n_in)], dim=-1)
    A = op.to_dense()
    assert A.shape == (*op.batch_shape, *op.shape)
    _assert_close(A, columns, 1e-14)


@pytest.mark.parametrize("n", [1, 2, 7, *SIZES])
def test_dct_matches_scipy(n: int) -> None:
    x = _randn(torch.Generator().manual_seed(n), 4, n)
    op = DCT(n)
    _assert_close(op(x), torch.from_numpy(scipy.fft.dct(x.numpy(), norm="ortho")), 1e-13)
    _assert_close(op.T(x), torch.from_numpy(scipy.fft.idct(x.numpy(), norm="ortho")), 1e-13)
    C = torch.from_numpy(scipy.fft.dct(np.eye(n), norm="ortho", axis=0))
    _assert_close(op.to_dense(dtype=F64), C, 1e-13)


@pytest.mark.parametrize("n", SIZES)
def test_fourier_matches_numpy(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    for x in (_randn(g, 3, n), _randn(g, 3, n, complex=True)):
        _assert_close(Fourier(n)(x), torch.from_numpy(np.fft.fft(x.numpy(), norm="ortho")), 1e-13)
        expected = np.fft.ifft(x.numpy(), norm="ortho")
        _assert_close(Fourier(n).T(x), torch.from_numpy(expected), 1e-13)
    assert Fourier(n).to_dense(dtype=F64).dtype == torch.complex128


def test_realview_definition() -> None:
    g = torch.Generator().manual_seed(3)
    n = 31
    x, y = _randn(g, 2, n), _randn(g, 2, 2 * n)
    op = RealView(Fourier(n))
    Fx = torch.fft.fft(x, norm="ortho")
    _assert_close(op(x), torch.cat([Fx.real, Fx.imag], dim=-1), 1e-14)
    expected = torch.fft.ifft(torch.complex(y[..., :n], y[..., n:]), norm="ortho").real
    _assert_close(op.T(y), expected, 1e-14)
    assert not op(x).is_complex() and op.shape == (2 * n, n)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("L", [1, 4, 7])
def test_convolution_matches_numpy(n: int, L: int) -> None:
    g = torch.Generator().manual_seed(n + L)
    k, x = _randn(g, L), _randn(g, n)
    full = np.convolve(x.numpy(), k.numpy())
    _assert_close(Convolution(k, n, "full")(x), torch.from_numpy(full), 1e-13)
    same = np.convolve(x.numpy(), k.numpy(), mode="same")
    _assert_close(Convolution(k, n, "same")(x), torch.from_numpy(same), 1e-13)
    _assert_close(Convolution(k, n, "causal")(x), torch.from_numpy(full[:n]), 1e-13)
    circ = np.array([sum(k[s] * x[(t - s) % n] for s in range(L)) for t in range(n)])
    _assert_close(Convolution(k, n, "circular")(x), torch.from_numpy(circ), 1e-13)


def test_convolution_keeps_imaginary_parts() -> None:
    g = torch.Generator().manual_seed(5)
    k, x = _randn(g, 5), _randn(g, 3, 20, complex=True)
    expected = np.stack([np.convolve(row, k.numpy()) for row in x.numpy()])
    _assert_close(Convolution(k, 20, "full")(x), torch.from_numpy(expected), 1e-13)


@pytest.mark.parametrize("name", [c for c in CASES if not _make(c, 8)[0].is_complex])
def test_real_operators_act_complex_linearly(name: str) -> None:
    op, g = _make(name, 31)
    x = _randn(g, 2, *op.batch_shape, op.shape[1], complex=True)
    y = _randn(g, 2, *op.batch_shape, op.shape[0], complex=True)
    _assert_close(op(x), torch.complex(op(x.real), op(x.imag)), 1e-14)
    _assert_close(op.T(y), torch.complex(op.T(y.real), op.T(y.imag)), 1e-14)


# --------------------------------------------------------------------------------------------
# 4. inputs are never modified


@pytest.mark.parametrize("name", list(CASES))
def test_inputs_not_mutated(name: str) -> None:
    op, g = _make(name, 31)
    x, y = _input(op, g), _output(op, g)
    mask = _bernoulli(g, 3, op.shape[0])
    before = (x.clone(), y.clone(), mask.clone(), op.to_dense().clone())
    op(x), op.T(y), op.gram_diagonal(mask), op.T.gram_diagonal(_bernoulli(g, op.shape[1]))
    for old, new in zip(before, (x, y, mask, op.to_dense()), strict=True):
        assert torch.equal(old, new)


# --------------------------------------------------------------------------------------------
# 5. differentiability


@pytest.mark.parametrize("n", [7, 8])
def test_gradcheck_dct(n: int) -> None:
    x = _randn(torch.Generator().manual_seed(n), 2, n).requires_grad_()
    assert torch.autograd.gradcheck(DCT(n), (x,))
    assert torch.autograd.gradcheck(DCT(n).T, (x,))
    w = torch.rand(n, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    assert torch.autograd.gradcheck(DCT(n).gram_diagonal, (w,))


def test_gradcheck_dense_matrix_and_reference() -> None:
    g = torch.Generator().manual_seed(2)
    M, x, y, w = _randn(g, 4, 5).requires_grad_(), _randn(g, 3, 5), _randn(g, 4), _randn(g, 4)
    assert Dense(M).matrix is M  # a learned dictionary gets the gradients
    assert torch.autograd.gradcheck(lambda M: Dense(M)(x), (M,))
    assert torch.autograd.gradcheck(lambda M: Dense(M).T(y), (M,))
    assert torch.autograd.gradcheck(lambda M: Dense(M).gram_diagonal(w), (M,))


def test_gradcheck_convolution_kernel_and_input() -> None:
    g = torch.Generator().manual_seed(3)
    k, x = _randn(g, 4).requires_grad_(), _randn(g, 2, 9).requires_grad_()
    for mode in ("full", "same", "causal", "circular"):
        assert torch.autograd.gradcheck(lambda k, x, m=mode: Convolution(k, 9, m)(x), (k, x))


# --------------------------------------------------------------------------------------------
# 6. batching


@pytest.mark.parametrize("name", list(CASES))
def test_batched_inputs(name: str) -> None:
    op, g = _make(name, 31)
    A = op.to_dense()
    x = _input(op, g, lead=(2, 3)) if op.batch_shape else _input(op, g, lead=(2, 3, 4))
    y = _output(op, g, lead=(2, 3)) if op.batch_shape else _output(op, g, lead=(2, 3, 4))
    _assert_close(op(x), _apply_dense(A, x), 1e-13)
    _assert_close(op.T(y), _apply_dense(A.mH, y), 1e-13)


@pytest.mark.parametrize("name", ["dct", "fourier", "conv_same", "realview_fourier", "dense"])
def test_batched_masks_match_one_mask_at_a_time(name: str) -> None:
    op, g = _make(name, 31)
    masks = _bernoulli(g, 2, 3, op.shape[0])
    got = op.gram_diagonal(masks)
    assert got.shape == (2, 3, op.shape[1])
    for i in range(2):
        for j in range(3):
            _assert_close(got[i, j], op.gram_diagonal(masks[i, j]), 1e-14)


def test_convolution_accepts_any_batch_shape() -> None:
    # The research code's Convolution1D only worked for (B, 1, L) input (defect E.11).
    g = torch.Generator().manual_seed(4)
    k = _randn(g, 5)
    op = Convolution(k, 16, "causal")
    for shape in [(16,), (7, 16), (2, 3, 16), (1, 1, 1, 16)]:
        x = _randn(g, *shape)
        assert op(x).shape == shape
        _assert_close(op(x), _apply_dense(op.to_dense(), x), 1e-13)


# --------------------------------------------------------------------------------------------
# 7. float32


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_float64(name: str) -> None:
    op, g = _make(name, 31)
    op32 = op.to(dtype=torch.float32)
    x, y, mask = _input(op, g), _output(op, g), _bernoulli(g, op.shape[0])
    for f64, f32, arg in (
        (op, op32, x),
        (op.T, op32.T, y),
    ):
        out32 = f32(arg.to(torch.complex64 if arg.is_complex() else torch.float32))
        assert out32.dtype in (torch.float32, torch.complex64)
        _assert_close(out32.to(f64(arg).dtype), f64(arg), 1e-5)
    gram32 = op32.gram_diagonal(mask.float())
    assert gram32.dtype == torch.float32
    _assert_close(gram32.double(), op.gram_diagonal(mask), 1e-5)


# --------------------------------------------------------------------------------------------
# 8. validation and adaptation


def test_wrong_last_dimension_names_x_and_the_size() -> None:
    op = Dense(torch.ones(3, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"x must have last dimension 5"):
        op(torch.ones(2, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"x must have last dimension 3"):
        op.T(torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match=r"mask must have last dimension 3"):
        op.gram_diagonal(torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match=r"x must be a torch\.Tensor"):
        DCT(4)(np.ones(4))
    with pytest.raises(ValueError, match="x must be a floating"):
        DCT(4)(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask must be real"):
        DCT(4).gram_diagonal(torch.ones(4, dtype=torch.complex128))
    with pytest.raises(ValueError, match="mask contains NaN"):
        DCT(4).gram_diagonal(torch.tensor([1.0, float("nan"), 0.0, 1.0]))


def test_constructors_validate_and_do_not_mutate() -> None:
    bad = torch.ones(3, 4, dtype=F64)
    bad[1, 2] = float("nan")
    snapshot = bad.clone()
    with pytest.raises(ValueError, match="M contains NaN"):
        Dense(bad)
    assert torch.equal(bad.isnan(), snapshot.isnan())
    assert torch.equal(bad.nan_to_num(), snapshot.nan_to_num())
    with pytest.raises(ValueError, match="M must have at least 2"):
        Dense(torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="M must be a floating"):
        Dense(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="d contains NaN or Inf"):
        Diagonal(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="mask contains NaN"):
        Masked(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        DCT(0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        Fourier(-3)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        Convolution(torch.ones(3, dtype=F64), 2.5)
    with pytest.raises(ValueError, match="kernel contains NaN"):
        Convolution(torch.tensor([1.0, float("nan")], dtype=F64), 8)
    with pytest.raises(ValueError, match="kernel must be real"):
        Convolution(torch.ones(3, dtype=torch.complex128), 8)
    with pytest.raises(ValueError, match="longer than n=4"):
        Convolution(torch.ones(5, dtype=F64), 4, "circular")
    with pytest.raises(ValueError, match="mode must be one of"):
        Convolution(torch.ones(3, dtype=F64), 8, "valid")
    with pytest.raises(ValueError, match="inner shapes do not match"):
        Compose(Dense(torch.ones(3, 4, dtype=F64)), DCT(5))
    with pytest.raises(ValueError, match="b must be a probunroll LinearOperator"):
        Compose(DCT(3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="op must be a probunroll LinearOperator"):
        RealView(torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"S \(values\) contains NaN"):
        SparseMatrix(scipy.sparse.csr_matrix(np.array([[np.nan, 0.0], [0.0, 1.0]])))


@pytest.mark.parametrize("obj", [[[1.0, 2.0]], "matrix", lambda x: x, 3.0, None])
def test_as_operator_rejects_unsupported_types(obj) -> None:
    with pytest.raises(ValueError, match=type(obj).__name__):
        as_operator(obj)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
def test_as_operator_adapts_everything_supported() -> None:
    g = torch.Generator().manual_seed(6)
    M = _randn(g, 4, 6)
    op = as_operator(M)
    assert isinstance(op, Dense) and op.matrix is M
    assert as_operator(op) is op
    assert isinstance(as_operator(_randn(g, 2, 4, 6)), Dense)
    assert as_operator(M.numpy()).dtype == torch.float64
    assert as_operator(M.numpy().astype(np.float32)).dtype == torch.float32
    assert as_operator(np.eye(3, dtype=np.int64)).dtype == torch.get_default_dtype()
    frozen = M.numpy().copy()
    frozen.setflags(write=False)
    _assert_close(as_operator(frozen).to_dense(), M, 0)  # no read-only warning (error in CI)
    sp = scipy.sparse.random(5, 6, density=0.3, format="csc", random_state=0)
    op_sp = as_operator(sp)
    assert isinstance(op_sp, SparseMatrix)
    _assert_close(op_sp.to_dense(), torch.from_numpy(sp.toarray()), 0)
    assert isinstance(as_operator(M.to_sparse()), SparseMatrix)
    assert isinstance(as_operator(M.to_sparse_csr()), SparseMatrix)
    assert isinstance(as_operator(_lo_dense(M)), LinearOperatorAdapter)
    assert as_operator(M, dtype=torch.float32).dtype == torch.float32
    assert as_operator(DCT(4), dtype=torch.float32).to_dense().dtype == torch.float32


def test_as_operator_wraps_a_scipy_linear_operator() -> None:
    """A scipy.sparse.linalg.LinearOperator (which lives in the scipy.sparse namespace but has
    no tocoo) becomes a ScipyLinearOperator that equals the dense matrix in every method."""
    g = torch.Generator().manual_seed(8)
    M, mask = _randn(g, 9, 13), _bernoulli(g, 2, 9)
    x, y = _randn(g, 3, 13), _randn(g, 3, 9)
    for lo in (
        scipy.sparse.linalg.aslinearoperator(M.numpy()),
        scipy.sparse.linalg.aslinearoperator(scipy.sparse.csr_matrix(M.numpy())),
        _scipy_lo(M).lo,
    ):
        op = as_operator(lo)
        assert isinstance(op, ScipyLinearOperator) and op.dtype == F64 and op.shape == (9, 13)
        _assert_close(op.to_dense(), M, 1e-15)
        _assert_close(op(x), x @ M.T, 1e-14)
        _assert_close(op.T(y), y @ M, 1e-14)
        _assert_close(op.gram_diagonal(mask), mask @ M.square(), 1e-14)
        _assert_close(op.T.gram_diagonal(), M.square().sum(-1), 1e-14)
        op32 = as_operator(lo, dtype=torch.float32)
        assert op32(x.float()).dtype == torch.float32
        assert op32.gram_diagonal().dtype == torch.float32


def test_scipy_linear_operator_gradients_and_missing_adjoint() -> None:
    g = torch.Generator().manual_seed(9)
    M = _randn(g, 5, 7)
    op = _scipy_lo(M)
    x = _randn(g, 2, 7).requires_grad_()
    y = _randn(g, 2, 5).requires_grad_()
    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradcheck(op.T, (y,))
    A = M.numpy()
    no_adjoint = as_operator(scipy.sparse.linalg.LinearOperator(A.shape, matvec=lambda v: A @ v))
    _assert_close(no_adjoint(x.detach()), x.detach() @ M.T, 1e-14)
    with pytest.raises(ValueError, match="needs rmatvec or rmatmat"):
        no_adjoint.T(y.detach())
    with pytest.raises(ValueError, match="lo must be a scipy"):
        ScipyLinearOperator(A)


def test_operator_algebra() -> None:
    g = torch.Generator().manual_seed(7)
    m = _bernoulli(g, 16)
    op = Masked(m) @ DCT(16)
    assert isinstance(op, Compose) and op.shape == (16, 16)
    x = _randn(g, 16)
    _assert_close(op(x), m * DCT(16)(x), 1e-14)
    with pytest.raises(TypeError):
        DCT(16) @ x
    assert "DCT(n=16)" in repr(op)
    assert Fourier(4).is_complex and not RealView(Fourier(4)).is_complex
    assert Dense(_randn(g, 2, 3, 4)).batch_shape == (2,)
    assert Masked(_bernoulli(g, 5, 16)).batch_shape == (5,)


# --------------------------------------------------------------------------------------------
# 9. GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", [c for c in CASES if not c.startswith("adapter")])
def test_adjoint_and_gram_on_cuda(name: str) -> None:
    op_cpu, g = _make(name, 64)
    op = op_cpu.to(device="cuda")
    x, y = _input(op_cpu, g).cuda(), _output(op_cpu, g).cuda()
    mask = _bernoulli(g, 3, op.shape[0]).cuda()
    Ax, AHy = op(x), op.T(y)
    assert Ax.device.type == "cuda" and AHy.device.type == "cuda"
    gap = abs(complex(_inner(Ax, y)) - complex(_inner(x, AHy)))
    assert gap <= 1e-10 * float(x.norm() * y.norm())
    got = op.gram_diagonal(mask)
    assert got.device.type == "cuda"
    _assert_close(got.cpu(), op_cpu.gram_diagonal(mask.cpu()), 1e-12)


def test_dct_table_cache_survives_inference_mode_then_autograd():
    """The DCT caches its twiddle tables; a first call under inference_mode must not poison
    later differentiated calls (inference tensors cannot be saved for backward)."""
    dct = DCT(37)
    with torch.inference_mode():
        dct(torch.randn(37, dtype=torch.float64))
    x = torch.randn(37, dtype=torch.float64, requires_grad=True)
    dct.T(dct(x)).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(37, dtype=torch.float64))
