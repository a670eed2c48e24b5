"""Linear operators with adjoints and exact masked Gram diagonals.

An operator ``op`` represents a (possibly batched) matrix ``A`` of shape ``(n_out, n_in)``:

- ``op(x)`` applies ``A`` to ``x`` of shape ``(..., n_in)`` and returns ``(..., n_out)``;
- ``op.T`` is the adjoint operator ``Aᴴ`` (conjugate transpose for complex operators), so
  ``op.T(y)`` applies it and ``op.T.T`` is ``op``;
- ``op.gram_diagonal(mask)`` is the exact diagonal of ``Aᴴ diag(mask) A``, that is
  ``d_j = Σ_k mask_k |A_kj|²``. ``mask`` has shape ``(..., n_out)`` and may carry batch dimensions
  (one mask per task); ``mask=None`` means all ones. This is the Jacobi preconditioner of the
  posterior precision ``P + Φᵀ Ω Ψ Φ`` of a latent Gaussian model.

Structured operators (:class:`DCT`, :class:`Fourier`, :class:`Convolution`) apply in
O(n log n) with FFTs and compute their masked Gram diagonals in O(n log n) as well, so a masked
DCT never becomes a dense matrix by accident. Everything is pure torch: operators work on any
device, are differentiable through ``op(x)``, ``op.T(y)`` and their parameters (a
:class:`Dense` operator keeps a reference to its matrix, so a learned dictionary gets
gradients), and never modify their inputs.

Operators whose matrix is real (``is_complex`` is False) act C-linearly on complex inputs:
real and imaginary parts are transformed separately, and nothing is discarded.

Examples
--------
>>> import torch
>>> from probunroll.operators import DCT, Masked, Compose
>>> mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
>>> op = Compose(Masked(mask), DCT(4))  # subsampled orthonormal DCT
>>> op(torch.ones(4, dtype=torch.float64)).shape
torch.Size([4])
>>> round(op.gram_diagonal().sum().item(), 12)  # trace of Aᵀ A = number of kept rows
3.0
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import scipy.fft
import torch

__all__ = [
    "DCT",
    "Compose",
    "Convolution",
    "Dense",
    "Diagonal",
    "Fourier",
    "LinearOperator",
    "LinearOperatorAdapter",
    "Masked",
    "RealView",
    "ScipyLinearOperator",
    "SparseMatrix",
    "as_operator",
]

_CONV_MODES = ("full", "same", "causal", "circular")


# --------------------------------------------------------------------------------------------
# helpers


_TO_COMPLEX = {
    torch.float16: torch.complex32,
    torch.float32: torch.complex64,
    torch.float64: torch.complex128,
}
_TO_REAL = {c: r for r, c in _TO_COMPLEX.items()}


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype matching ``dtype`` (complex128 -> float64)."""
    return _TO_REAL.get(dtype, dtype)


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype matching ``dtype`` (float64 -> complex128)."""
    return dtype if dtype.is_complex else _TO_COMPLEX.get(dtype, torch.complex64)


def _cast(t: torch.Tensor, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t.to(device, dtype)``, keeping complex tensors complex when ``dtype`` is real."""
    if dtype is not None:
        dtype = _complex_dtype(dtype) if t.is_complex() else dtype
    return t.to(device=device, dtype=dtype)


def _promote(*dtypes: torch.dtype | None) -> torch.dtype | None:
    out = None
    for dt in dtypes:
        if dt is not None:
            out = dt if out is None else torch.promote_types(out, dt)
    return out


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_tensor(
    t: Any, name: str, *, min_ndim: int = 1, allow_complex: bool = True
) -> torch.Tensor:
    """Validate an operator parameter: a floating (or complex) tensor, finite, non-empty."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}"
        )
    if t.is_complex() and not allow_complex:
        raise ValueError(f"{name} must be real, got dtype {t.dtype}")
    if not (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must be a floating or complex tensor, got dtype {t.dtype}")
    if t.numel() == 0 or any(s == 0 for s in t.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_size(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return n


def _real_linear(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a real-linear map to ``x``; complex ``x`` is mapped part by part (C-linearly)."""
    if x.is_complex():
        return torch.complex(f(x.real), f(x.imag))
    return f(x)


def _weighted_abs2_sum(w: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``Σ_k w_k |A_kj|²`` for ``w`` (..., n_out) and ``A`` (..., n_out, n_in)."""
    A2 = A.abs().square() if A.is_complex() else A.square()
    dt = _promote(w.dtype, A2.dtype)
    w, A2 = w.to(dt), A2.to(dt)
    if A2.ndim == 2:
        return w @ A2
    return (w.unsqueeze(-2) @ A2).squeeze(-2)


def _abs2(t: torch.Tensor) -> torch.Tensor:
    return t.abs().square() if t.is_complex() else t.square()


# --------------------------------------------------------------------------------------------
# base class


class LinearOperator:
    """Abstract (possibly batched) linear map ``A: (..., n_in) -> (..., n_out)``.

    Subclasses implement ``_apply`` (and usually ``_adjoint``, ``_gram_diagonal``,
    ``_adjoint_gram_diagonal``, ``_to``); the public methods validate their arguments once and
    dispatch. Operators are plain Python objects (not ``nn.Module``); they hold tensors by
    reference, so gradients flow to the tensors they were built from.

    Attributes
    ----------
    shape : tuple of int
        ``(n_out, n_in)``.
    batch_shape : torch.Size
        Batch dimensions of the operator itself (e.g. a stack of matrices); they broadcast
        against the batch dimensions of the input.
    is_complex : bool
        Whether the matrix has complex entries.
    dtype, device
        Of the operator's parameters, or ``None`` for parameter-free operators.
    """

    _T: LinearOperator | None = None
    _dtype: torch.dtype | None = None
    _device: torch.device | None = None

    # ---- to override ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size()

    @property
    def is_complex(self) -> bool:
        return False

    @property
    def dtype(self) -> torch.dtype | None:
        return self._dtype

    @property
    def device(self) -> torch.device | None:
        return self._device

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        # Operators whose adjoint is another operator (Dense, Diagonal, ...) override
        # _make_adjoint; the others must override _adjoint itself.
        if type(self)._make_adjoint is LinearOperator._make_adjoint:
            raise NotImplementedError(f"{type(self).__name__} does not implement its adjoint")
        return self.T._apply(y)

    def _make_adjoint(self) -> LinearOperator:
        return _Adjoint(self)

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        """diag(Aᴴ diag(w) A) for a validated real ``w`` (..., n_out); dense by default."""
        return _weighted_abs2_sum(w, self.to_dense(dtype=w.dtype, device=w.device))

    def _adjoint_gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        """diag(A diag(w) Aᴴ) for a validated real ``w`` (..., n_in); dense by default."""
        A = self.to_dense(dtype=w.dtype, device=w.device)
        return _weighted_abs2_sum(w, A.mH)

    def _to(self, device: Any, dtype: torch.dtype | None) -> LinearOperator:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._T = None
        new._device = torch.device(device) if device is not None else self._device
        new._dtype = _real_dtype(dtype) if dtype is not None else self._dtype
        return new

    # ---- public API -------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the operator: ``(..., n_in) -> (..., n_out)``."""
        self._check_input(x, "x", self.shape[1])
        return self._apply(x)

    @property
    def T(self) -> LinearOperator:
        """The adjoint operator ``Aᴴ`` (shape ``(n_in, n_out)``); ``op.T.T is op``."""
        if self._T is None:
            adj = self._make_adjoint()
            if adj is not self:
                adj._T = self
            self._T = adj
        return self._T

    def gram_diagonal(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Exact diagonal of ``Aᴴ diag(mask) A``.

        Parameters
        ----------
        mask : Tensor of shape (..., n_out), optional
            Real weights (0/1 observation masks, noise precisions, or both). Leading dimensions
            are batch dimensions, e.g. one mask per task ``(T, n_out)``. ``None`` means all ones.

        Returns
        -------
        Tensor of shape (..., n_in)
            ``d_j = Σ_k mask_k |A_kj|²``; batch dimensions of the mask and the operator
            broadcast.
        """
        n_out = self.shape[0]
        if mask is None:
            dtype = _real_dtype(self.dtype) if self.dtype is not None else None
            mask = torch.ones(n_out, dtype=dtype or torch.get_default_dtype(), device=self.device)
        else:
            self._check_input(mask, "mask", n_out)
            if mask.is_complex():
                raise ValueError(f"mask must be real, got dtype {mask.dtype}")
            if mask.dtype == torch.bool:
                mask = mask.to(_real_dtype(self.dtype or torch.get_default_dtype()))
            if not bool(torch.isfinite(mask).all()):
                raise ValueError("mask contains NaN or Inf")
        return self._gram_diagonal(mask)

    def to_dense(self, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        """Materialise the matrix, shape ``(*batch_shape, n_out, n_in)``.

        Costs one batched application to the ``n_in`` columns of the identity (for tests, exact
        EM on small problems and the general Gram-diagonal fallback). ``dtype`` is the real
        dtype of the result; complex operators return the matching complex dtype.
        """
        dtype = dtype or (self.dtype and _real_dtype(self.dtype)) or torch.get_default_dtype()
        dev = self.device if self.device is not None else device
        n_in, nb = self.shape[1], len(self.batch_shape)
        # Columns of the identity as a leading batch dimension, in front of the operator's own.
        eye = torch.eye(n_in, dtype=_real_dtype(dtype), device=dev).reshape(n_in, *[1] * nb, n_in)
        return _cast(self._apply(eye).movedim(0, -1), device=device, dtype=dtype)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> LinearOperator:
        """A new operator with its parameters on ``device`` / in ``dtype``.

        ``dtype`` is a real dtype; complex parameters get the matching complex dtype.
        """
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return self._to(device, dtype)

    def __matmul__(self, other: Any) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return Compose(self, other)
        return NotImplemented

    def __repr__(self) -> str:
        batch = f", batch_shape={tuple(self.batch_shape)}" if self.batch_shape else ""
        return f"{type(self).__name__}(shape={self.shape}{batch})"

    # ---- shared validation ------------------------------------------------------------------
    def _check_input(self, x: Any, name: str, size: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != size:
            raise ValueError(
                f"{name} must have last dimension {size} for {self!r}, got shape {tuple(x.shape)}"
            )
        bool_ok = name == "mask" and x.dtype == torch.bool
        if not (x.is_floating_point() or x.is_complex() or bool_ok):
            raise ValueError(f"{name} must be a floating or complex tensor, got dtype {x.dtype}")
        if self.device is not None and not _same_device(x.device, self.device):
            raise ValueError(f"{name} is on {x.device} but the operator is on {self.device}")


class _TensorOperator(LinearOperator):
    """An operator defined by one tensor (named by ``_param``): its dtype, device, complexity."""

    _param = ""

    @classmethod
    def _trusted(cls, t: torch.Tensor) -> _TensorOperator:
        """Build from an already validated tensor (e.g. the adjoint's ``M.mH``)."""
        op = object.__new__(cls)
        setattr(op, cls._param, t)
        return op

    @property
    def _tensor(self) -> torch.Tensor:
        return getattr(self, self._param)

    @property
    def is_complex(self) -> bool:
        return self._tensor.is_complex()

    @property
    def dtype(self) -> torch.dtype:
        return self._tensor.dtype

    @property
    def device(self) -> torch.device:
        return self._tensor.device


class _Adjoint(LinearOperator):
    """The adjoint of an operator that has no cheaper closed form for it."""

    def __init__(self, base: LinearOperator) -> None:
        self.base = base

    @property
    def shape(self) -> tuple[int, int]:
        n_out, n_in = self.base.shape
        return (n_in, n_out)

    @property
    def batch_shape(self) -> torch.Size:
        return self.base.batch_shape

    @property
    def is_complex(self) -> bool:
        return self.base.is_complex

    @property
    def dtype(self) -> torch.dtype | None:
        return self.base.dtype

    @property
    def device(self) -> torch.device | None:
        return self.base.device

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.base._adjoint(x)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.base._apply(y)

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return self.base._adjoint_gram_diagonal(w)

    def _adjoint_gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return self.base._gram_diagonal(w)

    def to_dense(self, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        return self.base.to_dense(dtype=dtype, device=device).mH

    def _to(self, device: Any, dtype: torch.dtype | None) -> LinearOperator:
        return self.base.to(device=device, dtype=dtype).T

    def __repr__(self) -> str:
        return f"{self.base!r}.T"


# --------------------------------------------------------------------------------------------
# dense and diagonal


class Dense(_TensorOperator):
    """A dense matrix ``M``, optionally batched.

    Parameters
    ----------
    M : Tensor of shape (n_out, n_in) or (..., n_out, n_in)
        Real or complex. Kept by reference (not copied), so gradients reach it.

    Notes
    -----
    ``op(x) = x @ M.mT`` (one GEMM for the whole input batch) for an unbatched ``M``;
    ``op.T(y) = y @ conj(M)``; ``gram_diagonal(mask) = mask @ |M|²``.
    """

    _param = "matrix"

    def __init__(self, M: torch.Tensor) -> None:
        _check_tensor(M, "M", min_ndim=2)
        self.matrix = M

    @property
    def shape(self) -> tuple[int, int]:
        return (self.matrix.shape[-2], self.matrix.shape[-1])

    @property
    def batch_shape(self) -> torch.Size:
        return self.matrix.shape[:-2]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        dt = _promote(x.dtype, self.matrix.dtype)
        M, x = self.matrix.to(dt), x.to(dt)
        if M.ndim == 2:
            return x @ M.mT
        return (M @ x.unsqueeze(-1)).squeeze(-1)

    def _make_adjoint(self) -> LinearOperator:
        return Dense._trusted(self.matrix.mH)

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return _weighted_abs2_sum(w, self.matrix)

    def to_dense(self, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        return _cast(self.matrix, device=device, dtype=dtype)

    def _to(self, device: Any, dtype: torch.dtype | None) -> LinearOperator:
        return Dense._trusted(_cast(self.matrix, device=device, dtype=dtype))


class Diagonal(_TensorOperator):
    """Elementwise scaling ``y = d ⊙ x``.

    Parameters
    ----------
    d : Tensor of shape (n,) or (..., n)
        Real or complex diagonal; leading dimensions are operator batch dimensions.

    Notes
    -----
    Square ``(n, n)``. The adjoint multiplies by ``conj(d)``; ``gram_diagonal(mask) =
    |d|² ⊙ mask``.
    """

    _name = "d"
    _param = "diag"

    def __init__(self, d: torch.Tensor) -> None:
        self.diag = _check_tensor(d, self._name)

    @property
    def shape(self) -> tuple[int, int]:
        n = self.diag.shape[-1]
        return (n, n)

    @property
    def batch_shape(self) -> torch.Size:
        return self.diag.shape[:-1]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.diag * x

    def _make_adjoint(self) -> LinearOperator:
        return type(self)._trusted(self.diag.conj()) if self.is_complex else self

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return _abs2(self.diag) * w

    def _adjoint_gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return _abs2(self.diag) * w

    def to_dense(self, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        return _cast(torch.diag_embed(self.diag), device=device, dtype=dtype)

    def _to(self, device: Any, dtype: torch.dtype | None) -> LinearOperator:
        return type(self)._trusted(_cast(self.diag, device=device, dtype=dtype))


class Masked(Diagonal):
    """Observation mask ``y = mask ⊙ x`` (same length in and out).

    Parameters
    ----------
    mask : Tensor of shape (n,) or (T, n) or (..., n)
        0/1 entries or general weights; boolean masks are converted to the default float
        dtype. Leading dimensions are batch dimensions (one mask per task).

    Notes
    -----
    Never modifies its input (the research code's ``Undersampling`` zeroed it in place). The
    adjoint is the operator itself (conjugated weights if complex); ``gram_diagonal(w) =
    |mask|² ⊙ w``. In a :class:`Compose` ``Compose(Masked(m), op)``, the Gram diagonal is
    ``op.gram_diagonal(|m|² ⊙ w)``, exact and as cheap as ``op``'s.
    """

    _name = "mask"

    def __init__(self, mask: torch.Tensor) -> None:
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            mask = mask.to(torch.get_default_dtype())
        super().__init__(mask)

    @property
    def mask(self) -> torch.Tensor:
        return self.diag


# --------------------------------------------------------------------------------------------
# transforms


def _dct_tables(n: int, dtype: torch.dtype, device: Any) -> tuple[torch.Tensor, ...]:
    """cos/sin of πk/(2n), the orthonormal scale s_k (√(1/n) at k=0, √(2/n) otherwise) and
    e^{iπk/n}; cached per (n, dtype, device), since a solver applies the DCT every step."""
    return _dct_tables_cached(n, dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _dct_tables_cached(
    n: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    # Built outside inference mode: a cached inference tensor could never be saved for
    # backward by a later, differentiated call.
    with torch.inference_mode(False), torch.no_grad():
        k = torch.arange(n, dtype=dtype, device=device)
        theta = k * (math.pi / (2 * n))
        scale = torch.full((n,), math.sqrt(2.0 / n), dtype=dtype, device=device)
        scale[0] = math.sqrt(1.0 / n)
        polar = torch.polar(torch.ones_like(k), 2 * theta)
        return torch.cos(theta), torch.sin(theta), scale, polar


class DCT(LinearOperator):
    """Orthonormal DCT-II of length ``n`` (equals ``scipy.fft.dct(x, norm="ortho")``).

    ``C_kj = s_k cos(π k (2j + 1) / (2n))`` with ``s_0 = √(1/n)``, ``s_k = √(2/n)``; ``C`` is
    orthogonal, so the adjoint is the inverse, the orthonormal DCT-III
    (``scipy.fft.idct(y, norm="ortho")``).

    Parameters
    ----------
    n : int
        Transform length.

    Notes
    -----
    Applied in O(n log n) with one FFT of length n (Makhoul's even/odd reordering), pure
    torch: works on any device and is differentiable. Complex input is transformed part by
    part.

    The masked Gram diagonal is exact and O(n log n): with ``C_kj² = s_k² (1 + cos(π k (2j+1)
    / n)) / 2``, ``Σ_k w_k C_kj² = Σ_k u_k + Re Σ_k (u_k e^{iπk/n}) e^{2πi kj/n}`` where
    ``u_k = w_k s_k² / 2``, and the last sum is one inverse FFT.
    """

    def __init__(self, n: int) -> None:
        self.n = _check_size(n, "n")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.n
        # Makhoul's reordering v = [x_0, x_2, x_4, ..., x_5, x_3, x_1] by slicing (an index
        # gather is ~10x slower on CPU), then a real FFT extended by Hermitian symmetry.
        v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
        h = n // 2 + 1
        Vh = torch.fft.rfft(v, dim=-1)
        V = torch.cat([Vh, Vh[..., 1 : n - h + 1].flip(-1).conj()], dim=-1)
        cos, sin, scale, _ = _dct_tables(n, x.dtype, x.device)
        # X_k = s_k Re(e^{-iπk/(2n)} V_k)
        return scale * (cos * V.real + sin * V.imag)

    def _inverse(self, X: torch.Tensor) -> torch.Tensor:
        n = self.n
        cos, sin, scale, _ = _dct_tables(n, X.dtype, X.device)
        # V_k = e^{iπk/(2n)} (c_k - i c_{n-k}) with c = X / s and c_n = 0; V is Hermitian.
        c = X / scale
        c_rev = torch.cat([torch.zeros_like(c[..., :1]), c[..., 1:].flip(-1)], dim=-1)
        h = n // 2 + 1
        V = torch.complex((cos * c + sin * c_rev)[..., :h], (sin * c - cos * c_rev)[..., :h])
        v = torch.fft.irfft(V, n=n, dim=-1)
        # undo the reordering: x_{2i} = v_i, x_{2i+1} = v_{n-1-i}
        half, m = (n + 1) // 2, n // 2
        even, odd = v[..., :half], v[..., half:].flip(-1)
        x = torch.stack([even[..., :m], odd], dim=-1).flatten(-2)
        return torch.cat([x, even[..., m:]], dim=-1) if n % 2 else x

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return _real_linear(self._forward, x)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return _real_linear(self._inverse, y)

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        _, _, scale, phase = _dct_tables(self.n, w.dtype, w.device)
        u = w * scale.square() / 2
        s = torch.fft.ifft(u * phase, dim=-1, norm="forward").real
        return u.sum(-1, keepdim=True) + s

    def _adjoint_gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        # diag(C diag(w) Cᵀ)_k = s_k²/2 [Σ_j w_j + Re(e^{iπk/n} Σ_j w_j e^{2πi kj/n})]
        _, _, scale, phase = _dct_tables(self.n, w.dtype, w.device)
        s = (phase * torch.fft.ifft(w, dim=-1, norm="forward")).real
        return scale.square() / 2 * (w.sum(-1, keepdim=True) + s)

    def __repr__(self) -> str:
        return f"DCT(n={self.n})"


class Fourier(LinearOperator):
    """Orthonormal discrete Fourier transform of length ``n``.

    Convention: ``F_kj = e^{-2πi kj/n} / √n``, i.e. ``op(x) = torch.fft.fft(x, norm="ortho")``
    (the same as ``numpy.fft.fft(x, norm="ortho")``). Input real or complex, output complex.
    The adjoint is the inverse, ``torch.fft.ifft(y, norm="ortho")``.

    Parameters
    ----------
    n : int
        Transform length.

    Notes
    -----
    ``|F_kj|² = 1/n``, so ``gram_diagonal(mask)_j = Σ_k mask_k / n`` for every ``j``. To model a
    *real* signal measured by complex Fourier coefficients with a real Gaussian model, use
    :class:`RealView` (``RealView(Fourier(n))``), which stacks real and imaginary parts.
    """

    def __init__(self, n: int) -> None:
        self.n = _check_size(n, "n")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def is_complex(self) -> bool:
        return True

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft(x, dim=-1, norm="ortho")

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifft(y, dim=-1, norm="ortho")

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return (w.sum(-1, keepdim=True) / self.n).expand(*w.shape[:-1], self.n).contiguous()

    _adjoint_gram_diagonal = _gram_diagonal

    def __repr__(self) -> str:
        return f"Fourier(n={self.n})"


class RealView(LinearOperator):
    """Real form of a complex-output operator on real inputs.

    Maps ``x ∈ R^{n_in}`` to ``[Re(op x), Im(op x)] ∈ R^{2 n_out}``. Its adjoint maps
    ``y = [y_r, y_i]`` to ``Re(opᴴ (y_r + i y_i))``. This is how a real signal with complex
    (e.g. Fourier) measurements gets a well-defined *real* Gaussian model: the real and
    imaginary parts are separate real observations, each with its own mask entry / precision.

    Parameters
    ----------
    op : LinearOperator
        Inner operator of shape ``(n_out, n_in)``; usually complex.

    Notes
    -----
    Shape ``(2 n_out, n_in)``. The real matrix acts C-linearly on complex inputs (parts
    separately). ``gram_diagonal`` is exact: for ``Fourier(n)`` it is O(n log n), using
    ``cos²(2πkj/n) = (1 + cos(4πkj/n))/2`` and ``cos(4πkj/n) = Re e^{2πi k (2j mod n)/n}``;
    for any other inner operator it falls back to the dense formula (``n_in`` applications).
    """

    def __init__(self, op: LinearOperator) -> None:
        if not isinstance(op, LinearOperator):
            raise ValueError(f"op must be a probunroll LinearOperator, got {type(op).__name__}")
        self.op = op

    @property
    def shape(self) -> tuple[int, int]:
        n_out, n_in = self.op.shape
        return (2 * n_out, n_in)

    @property
    def batch_shape(self) -> torch.Size:
        return self.op.batch_shape

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self.op.dtype is None else _real_dtype(self.op.dtype)

    @property
    def device(self) -> torch.device | None:
        return self.op.device

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.op._apply(x)
        im = z.imag if z.is_complex() else torch.zeros_like(z)
        return torch.cat([z.real, im], dim=-1)

    def _backward(self, y: torch.Tensor) -> torch.Tensor:
        n_out = self.op.shape[0]
        return self.op.T._apply(torch.complex(y[..., :n_out], y[..., n_out:])).real

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return _real_linear(self._forward, x)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return _real_linear(self._backward, y)

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        if type(self.op) is not Fourier:
            return super()._gram_diagonal(w)
        n = self.op.n
        w_re, w_im = w[..., :n], w[..., n:]
        g = torch.fft.ifft(w_re - w_im, dim=-1, norm="forward").real  # Σ_k a_k cos(2πkm/n)
        idx = (2 * torch.arange(n, device=w.device)) % n
        return ((w_re + w_im).sum(-1, keepdim=True) + g[..., idx]) / (2 * n)

    def to_dense(self, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        A = self.op.to_dense(dtype=dtype, device=device)
        im = A.imag if A.is_complex() else torch.zeros_like(A)
        return torch.cat([A.real, im], dim=-2)

    def _to(self, device: Any, dtype: torch.dtype | None) -> LinearOperator:
        return RealView(self.op.to(device=device, dtype=dtype))

    def __repr__(self) -> str:
        return f"RealView({self.op!r})"


class Convolution(_TensorOperator):
    """Linear (or circular) convolution ``y = k * x`` with a real kernel, via FFTs.

    Parameters
    ----------
    kernel : Tensor of shape (L,) or (..., L)
        Real kernel; leading dimensions are operator batch dimensions that broadcast against
        the input's batch dimensions.
    n : int
        Input length.
    mode : {"full", "same", "causal", "circular"}
        Boundary handling; ``y_t = Σ_s k_{t-s} x_s`` with

        - ``"full"``: zero boundary, ``n_out = n + L - 1`` (``numpy.convolve(x, k)``);
        - ``"same"``: the centred ``n`` samples of "full", starting at ``(L - 1) // 2``
          (``numpy.convolve(x, k, mode="same")`` when ``L <= n``);
        - ``"causal"``: the first ``n`` samples of "full", ``y_t = Σ_{s≤t} k_{t-s} x_s`` (e.g.
          calcium-imaging deconvolution with a decaying kernel), ``n_out = n``;
        - ``"circular"``: periodic boundary, ``n_out = n``, indices mod ``n``; needs ``L <= n``.

    Notes
    -----
    The adjoint is the correlation ``(Aᵀ y)_s = Σ_t k_{t-s} y_t`` (``y`` zero-padded back into
    the full output range), also via FFTs; FFT sizes are ≥ ``n + L - 1`` so nothing wraps
    around (except in "circular" mode, where wrapping is the model). Complex inputs are
    convolved part by part. The exact masked Gram diagonal ``d_j = Σ_t w_t k_{t-j}²`` is the
    adjoint of the same convolution with kernel ``k²`` applied to ``w``: O(n log n).
    """

    _param = "kernel"

    def __init__(self, kernel: torch.Tensor, n: int, mode: str = "full") -> None:
        _check_tensor(kernel, "kernel", allow_complex=False)
        n = _check_size(n, "n")
        if mode not in _CONV_MODES:
            raise ValueError(f"mode must be one of {_CONV_MODES}, got {mode!r}")
        if mode == "circular" and kernel.shape[-1] > n:
            raise ValueError(
                f"kernel of length {kernel.shape[-1]} is longer than n={n}, not allowed for "
                "mode='circular'"
            )
        self.kernel, self.n, self.mode = kernel, n, mode
        L = kernel.shape[-1]
        self._n_out = n + L - 1 if mode == "full" else n
        self._start = (L - 1) // 2 if mode == "same" else 0
        # FFT length: ≥ n + L - 1 so the linear convolution does not wrap, except "circular".
        self._nfft = n if mode == "circular" else scipy.fft.next_fast_len(n + L - 1, real=True)

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n_out, self.n)

    @property
    def batch_shape(self) -> torch.Size:
        return self.kernel.shape[:-1]

    def _convolve(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``x`` (..., n) real -> (..., n_out) for kernel ``k`` under this operator's mode."""
        nfft = self._nfft
        X = torch.fft.rfft(x, n=nfft, dim=-1)
        y = torch.fft.irfft(X * torch.fft.rfft(k, n=nfft, dim=-1), n=nfft, dim=-1)
        start = self._start
        return y[..., start : start + self.shape[0]]

    def _correlate(self, y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`_convolve`: ``y`` (..., n_out) real -> (..., n)."""
        nfft = self._nfft
        start = self._start
        if start:  # place y back into the full output range
            y = torch.nn.functional.pad(y, (start, 0))
        Y = torch.fft.rfft(y, n=nfft, dim=-1)
        z = torch.fft.irfft(Y * torch.fft.rfft(k, n=nfft, dim=-1).conj(), n=nfft, dim=-1)
        return z[..., : self.n]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return _real_linear(lambda v: self._convolve(v, self.kernel), x)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return _real_linear(lambda v: self._correlate(v, self.kernel), y)

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return self._correlate(w, self.kernel.square())

    def _adjoint_gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        # diag(A diag(w) Aᵀ)_t = Σ_s w_s k_{t-s}²: the same convolution with k².
        return self._convolve(w, self.kernel.square())

    def _to(self, device: Any, dtype: torch.dtype | None) -> LinearOperator:
        return Convolution(self.kernel.to(device=device, dtype=dtype), self.n, self.mode)

    def __repr__(self) -> str:
        return (
            f"Convolution(kernel_size={self.kernel.shape[-1]}, n={self.n}, mode={self.mode!r}"
            + (f", batch_shape={tuple(self.batch_shape)})" if self.batch_shape else ")")
        )


# --------------------------------------------------------------------------------------------
# composition


class Compose(LinearOperator):
    """Composition ``a ∘ b``: apply ``b``, then ``a``.

    Parameters
    ----------
    a : LinearOperator, shape (n_out, m)
    b : LinearOperator, shape (m, n_in)

    Notes
    -----
    The adjoint is ``Compose(b.T, a.T)``. ``gram_diagonal`` is exact and keeps the structure
    where it can:

    - ``Compose(Masked(m) or Diagonal(m), op)``: ``op.gram_diagonal(mask ⊙ |m|²)``;
    - ``Compose(op, Masked(m) or Diagonal(m))``: ``|m|² ⊙ op.gram_diagonal(mask)``;
    - nested compositions are re-associated so that a diagonal factor at either end is found.

    So chains such as ``Masked ∘ DCT ∘ Diagonal`` or ``Masked ∘ RealView(Fourier)`` stay
    O(n log n). Otherwise (e.g. ``Dense ∘ Convolution``, or a mask inside ``RealView``) it
    falls back to the dense formula from :meth:`to_dense`, which costs ``n_in`` applications
    of the composition in one batch.
    """

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        for name, op in (("a", a), ("b", b)):
            if not isinstance(op, LinearOperator):
                raise ValueError(
                    f"{name} must be a probunroll LinearOperator, got {type(op).__name__}; "
                    "wrap it with as_operator()"
                )
        if a.shape[1] != b.shape[0]:
            raise ValueError(
                f"inner shapes do not match: a has shape {a.shape} (input {a.shape[1]}) but "
                f"b has shape {b.shape} (output {b.shape[0]})"
            )
        if a.device is not None and b.device is not None and not _same_device(a.device, b.device):
            raise ValueError(f"a is on {a.device} but b is on {b.device}")
        torch.broadcast_shapes(a.batch_shape, b.batch_shape)  # raises if incompatible
        self.a, self.b = a, b

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], self.b.shape[1])

    @property
    def batch_shape(self) -> torch.Size:
        return torch.broadcast_shapes(self.a.batch_shape, self.b.batch_shape)

    @property
    def is_complex(self) -> bool:
        return self.a.is_complex or self.b.is_complex

    @property
    def dtype(self) -> torch.dtype | None:
        return _promote(self.a.dtype, self.b.dtype)

    @property
    def device(self) -> torch.device | None:
        return self.a.device if self.a.device is not None else self.b.device

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.a._apply(self.b._apply(x))

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.b.T._apply(self.a.T._apply(y))

    def _make_adjoint(self) -> LinearOperator:
        return Compose(self.b.T, self.a.T)

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        a, b = self.a, self.b
        if isinstance(a, Diagonal):
            return b._gram_diagonal(w * _abs2(a.diag))
        if isinstance(b, Diagonal):
            return _abs2(b.diag) * a._gram_diagonal(w)
        # Re-associate so that a diagonal factor at either end reaches the fast paths above.
        if isinstance(a, Compose) and isinstance(a.a, Diagonal):
            return Compose(a.b, b)._gram_diagonal(w * _abs2(a.a.diag))
        if isinstance(b, Compose) and isinstance(b.b, Diagonal):
            return _abs2(b.b.diag) * Compose(a, b.a)._gram_diagonal(w)
        return super()._gram_diagonal(w)

    def _adjoint_gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return self.T._gram_diagonal(w)

    def _to(self, device: Any, dtype: torch.dtype | None) -> LinearOperator:
        return Compose(self.a.to(device=device, dtype=dtype), self.b.to(device=device, dtype=dtype))

    def __repr__(self) -> str:
        return f"Compose({self.a!r}, {self.b!r})"


# --------------------------------------------------------------------------------------------
# adapters


def _spmm(S: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sparse ``S`` (m, n) times the rows of ``x`` (..., n) -> (..., m)."""
    batch = x.shape[:-1]
    dt = _promote(S.dtype, x.dtype)
    out = torch.sparse.mm(S.to(dt), x.to(dt).reshape(-1, x.shape[-1]).T).T
    return out.reshape(*batch, S.shape[0])


def _sparse_abs2(S: torch.Tensor) -> torch.Tensor:
    return torch.sparse_coo_tensor(
        S.indices(), _abs2(S.values()), S.shape, check_invariants=False, is_coalesced=True
    )


class SparseMatrix(_TensorOperator):
    """A sparse matrix (torch sparse COO/CSR tensor or scipy.sparse matrix/array).

    Parameters
    ----------
    S : torch sparse tensor or scipy.sparse matrix, shape (n_out, n_in)
        Real or complex; stored internally as a coalesced COO tensor together with its
        conjugate transpose.

    Notes
    -----
    ``op(x) = (S @ x.reshape(-1, n_in).T).T`` reshaped back; differentiable in ``x``.
    ``gram_diagonal(mask) = mask @ |S|²`` (exact, O(nnz) per mask row).
    """

    _param = "sparse"

    def __init__(self, S: Any) -> None:
        if type(S).__module__.startswith("scipy.sparse"):
            S = _scipy_to_torch(S)
        if not isinstance(S, torch.Tensor) or S.layout == torch.strided:
            raise ValueError(
                f"S must be a torch sparse tensor or a scipy.sparse matrix, got {type(S).__name__}"
            )
        if S.ndim != 2:
            raise ValueError(f"S must be 2-D, got shape {tuple(S.shape)}")
        if S.shape[0] == 0 or S.shape[1] == 0:
            raise ValueError(f"S must not be empty, got shape {tuple(S.shape)}")
        S = S.to_sparse_coo().coalesce() if S.layout != torch.sparse_coo else S.coalesce()
        if S.values().numel():
            _check_tensor(S.values(), "S (values)")
        self._setup(S, S.t().conj().coalesce())

    def _setup(self, S: torch.Tensor, SH: torch.Tensor) -> None:
        self.sparse, self._sparse_h = S, SH

    @classmethod
    def _trusted(cls, S: torch.Tensor, SH: torch.Tensor) -> SparseMatrix:
        op = object.__new__(cls)
        op._setup(S, SH)
        return op

    @property
    def shape(self) -> tuple[int, int]:
        return (self.sparse.shape[0], self.sparse.shape[1])

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_complex() and not self.is_complex:
            return _real_linear(lambda v: _spmm(self.sparse, v), x)
        return _spmm(self.sparse, x)

    def _make_adjoint(self) -> LinearOperator:
        return SparseMatrix._trusted(self._sparse_h, self.sparse)

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return _spmm(_sparse_abs2(self._sparse_h), w)

    def to_dense(self, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        return _cast(self.sparse.to_dense(), device=device, dtype=dtype)

    def _to(self, device: Any, dtype: torch.dtype | None) -> LinearOperator:
        return SparseMatrix._trusted(
            _cast(self.sparse, device, dtype).coalesce(),
            _cast(self._sparse_h, device, dtype).coalesce(),
        )


def _scipy_to_torch(S: Any) -> torch.Tensor:
    import numpy as np

    coo = S.tocoo()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(np.array(coo.data, copy=True))
    return torch.sparse_coo_tensor(indices, values, coo.shape, check_invariants=True).coalesce()


class LinearOperatorAdapter(LinearOperator):
    """Wraps a ``linear_operator.LinearOperator`` (GPyTorch's operator library).

    Parameters
    ----------
    lo : linear_operator.LinearOperator, shape (..., n_out, n_in)

    Notes
    -----
    Applies through ``lo.matmul``, the adjoint through ``lo.mT`` (conjugated for complex
    dtypes); ``gram_diagonal`` uses the dense fallback (``lo.to_dense()``). ``linear_operator``
    is an optional dependency and is imported only when needed.
    """

    def __init__(self, lo: Any) -> None:
        try:
            from linear_operator.operators import LinearOperator as _LO
        except ImportError as err:  # pragma: no cover - optional dependency
            raise ValueError(
                "lo: the optional dependency linear_operator is not installed"
            ) from err
        if not isinstance(lo, _LO):
            raise ValueError(
                f"lo must be a linear_operator.LinearOperator, got {type(lo).__name__}"
            )
        if len(lo.shape) < 2:
            raise ValueError(f"lo must have at least 2 dimensions, got shape {tuple(lo.shape)}")
        self.lo = lo

    @property
    def shape(self) -> tuple[int, int]:
        return (self.lo.shape[-2], self.lo.shape[-1])

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size(self.lo.shape[:-2])

    @property
    def is_complex(self) -> bool:
        return self.lo.dtype.is_complex

    @property
    def dtype(self) -> torch.dtype:
        return self.lo.dtype

    @property
    def device(self) -> torch.device:
        return self.lo.device

    @staticmethod
    def _matmul(lo: Any, x: torch.Tensor) -> torch.Tensor:
        if x.is_complex() and not lo.dtype.is_complex:
            return _real_linear(lambda v: LinearOperatorAdapter._matmul(lo, v), x)
        x = x.to(_promote(x.dtype, lo.dtype))
        if len(lo.shape) == 2:
            return lo.matmul(x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], lo.shape[-2])
        return lo.matmul(x.unsqueeze(-1)).squeeze(-1)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(self.lo, x)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if self.is_complex:
            return self._matmul(self.lo.mT, y.conj()).conj()
        return self._matmul(self.lo.mT, y)

    def to_dense(self, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        return _cast(self.lo.to_dense(), device=device, dtype=dtype)

    def _to(self, device: Any, dtype: torch.dtype | None) -> LinearOperator:
        lo = self.lo.to(device) if device is not None else self.lo
        if dtype is not None:
            lo = lo.to(_complex_dtype(dtype) if self.is_complex else dtype)
        return LinearOperatorAdapter(lo)


class _HostApply(torch.autograd.Function):
    """``A x`` (or ``Aᴴ x``) through a host (numpy) callback; the backward applies the other.

    For a linear map ``y = A x`` the vector-Jacobian product is ``Aᴴ ḡ`` (torch's convention
    for complex tensors as well), so gradients reach ``x`` even though the forward leaves torch.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, op: ScipyLinearOperator, adjoint: bool) -> torch.Tensor:
        ctx.op, ctx.adjoint = op, adjoint
        return op._host(x, adjoint)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.op._host(grad, not ctx.adjoint), None, None


class ScipyLinearOperator(LinearOperator):
    """Wraps a ``scipy.sparse.linalg.LinearOperator`` (anything with ``matvec``/``rmatvec``).

    Parameters
    ----------
    lo : scipy.sparse.linalg.LinearOperator, shape (n_out, n_in)
        Applied through ``lo.matmat``, its adjoint through ``lo.rmatmat`` (scipy's conjugate
        transpose: a ``LinearOperator`` built without ``rmatvec``/``rmatmat`` has no adjoint,
        and applying ``op.T`` then raises a ``ValueError``).
    block : int, optional
        Number of unit vectors probed at a time by the Gram diagonals (default 256).

    Notes
    -----
    The callbacks run on the host in numpy: inputs are copied to CPU, the whole input batch
    goes through one ``matmat`` call (n_in × batch), and the result is copied back to the
    input's device and to the promoted dtype of the input and the operator (``lo.dtype``, or the
    dtype given to :meth:`to`). Both directions are differentiable in the input (the backward
    of one is the other).

    ``gram_diagonal(mask)`` is exact but has no structure to exploit: it probes the columns
    ``A e_j`` in blocks of ``block`` unit vectors, n_in applications per call and memory
    O(n_out × block) (``to_dense`` probes all columns at once). Complex input to a real
    operator is transformed part by part.
    """

    def __init__(self, lo: Any, block: int = 256) -> None:
        splinalg = sys.modules.get("scipy.sparse.linalg")
        if splinalg is None or not isinstance(lo, splinalg.LinearOperator):
            raise ValueError(
                f"lo must be a scipy.sparse.linalg.LinearOperator, got {type(lo).__name__}"
            )
        if len(lo.shape) != 2 or lo.shape[0] == 0 or lo.shape[1] == 0:
            raise ValueError(f"lo must be 2-D and non-empty, got shape {tuple(lo.shape)}")
        import numpy as np

        np_dtype = np.dtype(lo.dtype) if lo.dtype is not None else np.dtype(np.float64)
        if np_dtype.kind not in "biufc":
            raise ValueError(f"lo: dtype {np_dtype} is not supported")
        self.lo = lo
        self.block = _check_size(block, "block")
        self._is_complex = np_dtype.kind == "c"
        if np_dtype.kind in "fc":
            self._dtype = _real_dtype(torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype)
        else:
            self._dtype = torch.get_default_dtype()

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.lo.shape[0]), int(self.lo.shape[1]))

    @property
    def is_complex(self) -> bool:
        return self._is_complex

    @property
    def dtype(self) -> torch.dtype:
        return _complex_dtype(self._dtype) if self._is_complex else self._dtype

    def _host(self, x: torch.Tensor, adjoint: bool) -> torch.Tensor:
        """Apply ``A`` (or ``Aᴴ``) to the rows of ``x`` via numpy; same dtype and device."""
        import numpy as np

        n_out = self.shape[1] if adjoint else self.shape[0]
        X = x.detach().reshape(-1, x.shape[-1])
        if X.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], n_out)
        X_np = X.cpu().numpy().T
        if not adjoint:
            out = self.lo.matmat(X_np)
        else:
            try:
                out = self.lo.rmatmat(X_np)
            except (NotImplementedError, TypeError) as err:
                # scipy raises NotImplementedError, or TypeError ('NoneType' object is not
                # callable) for a LinearOperator(shape, matvec) built without rmatvec.
                raise ValueError(
                    f"the adjoint of the scipy LinearOperator {type(self.lo).__name__} failed "
                    f"({type(err).__name__}: {err}); it needs rmatvec or rmatmat"
                ) from err
        out = torch.from_numpy(np.ascontiguousarray(np.asarray(out).T))
        return out.to(device=x.device, dtype=x.dtype).reshape(*x.shape[:-1], n_out)

    def _call(self, x: torch.Tensor, adjoint: bool) -> torch.Tensor:
        if x.is_complex() and not self._is_complex:
            return _real_linear(lambda v: self._call(v, adjoint), x)
        return _HostApply.apply(x.to(_promote(x.dtype, self.dtype)), self, adjoint)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x, adjoint=False)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._call(y, adjoint=True)

    def _probe_gram(self, w: torch.Tensor, adjoint: bool) -> torch.Tensor:
        """``Σ_k w_k |B_kj|²`` for ``B = A`` (or ``Aᴴ``), probing ``block`` columns at a time."""
        n_in = self.shape[0] if adjoint else self.shape[1]
        dt = _promote(w.dtype, self._dtype)
        eye = torch.eye(n_in, dtype=dt, device=w.device)
        parts = []
        for start in range(0, n_in, self.block):
            cols = self._call(eye[start : start + self.block], adjoint)  # rows: B e_j
            parts.append(_weighted_abs2_sum(w, cols.mT))
        return torch.cat(parts, dim=-1)

    def _gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return self._probe_gram(w, adjoint=False)

    def _adjoint_gram_diagonal(self, w: torch.Tensor) -> torch.Tensor:
        return self._probe_gram(w, adjoint=True)

    def __repr__(self) -> str:
        return f"ScipyLinearOperator(shape={self.shape}, lo={type(self.lo).__name__})"


def as_operator(obj: Any, dtype: torch.dtype | None = None, device: Any = None) -> LinearOperator:
    """Adapt ``obj`` to a probunroll :class:`LinearOperator`.

    Parameters
    ----------
    obj : LinearOperator, Tensor, numpy.ndarray, scipy.sparse matrix, scipy LinearOperator or
        linear_operator object
        - a probunroll operator is returned as is (moved/cast if ``dtype``/``device`` given);
        - a (batched) dense tensor ``(..., n_out, n_in)`` becomes :class:`Dense` (by reference
          when no cast is needed, so gradients reach it);
        - a numpy array becomes :class:`Dense` over ``torch.from_numpy`` (float64 stays
          float64; integer and boolean arrays become the default float dtype);
        - a scipy.sparse matrix or array becomes :class:`SparseMatrix`;
        - a ``scipy.sparse.linalg.LinearOperator`` becomes :class:`ScipyLinearOperator`
          (applied through numpy on the host);
        - a ``linear_operator.LinearOperator`` becomes :class:`LinearOperatorAdapter`.
    dtype : torch.dtype, optional
        Real dtype to cast to (complex data keeps the matching complex dtype).
    device : torch.device or str, optional

    Raises
    ------
    ValueError
        If ``obj`` has none of the supported types.
    """
    if isinstance(obj, LinearOperator):
        return obj if dtype is None and device is None else obj.to(device=device, dtype=dtype)
    if isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
        if not (obj.is_floating_point() or obj.is_complex()):
            obj = obj.to(torch.get_default_dtype())
        return Dense(_cast(obj, device=device, dtype=dtype))
    splinalg = sys.modules.get("scipy.sparse.linalg")
    if splinalg is not None and isinstance(obj, splinalg.LinearOperator):
        # before the scipy.sparse check below: its module is scipy.sparse.linalg._interface
        op = ScipyLinearOperator(obj)
        return op if dtype is None and device is None else op.to(device=device, dtype=dtype)
    if isinstance(obj, torch.Tensor) or type(obj).__module__.startswith("scipy.sparse"):
        op = SparseMatrix(obj)
        return op if dtype is None and device is None else op.to(device=device, dtype=dtype)
    if type(obj).__module__.startswith("numpy") and hasattr(obj, "__array__"):
        import numpy as np

        arr = np.asarray(obj)
        if arr.dtype.kind not in "biufc":
            raise ValueError(f"obj: numpy array of dtype {arr.dtype} is not supported")
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
            arr = arr.copy()
        M = torch.from_numpy(arr)
        if arr.dtype.kind in "biu":
            M = M.to(torch.get_default_dtype())
        return Dense(_cast(M, device=device, dtype=dtype))
    lo_module = sys.modules.get("linear_operator.operators")
    if lo_module is not None and isinstance(obj, lo_module.LinearOperator):
        op = LinearOperatorAdapter(obj)
        return op if dtype is None and device is None else op.to(device=device, dtype=dtype)
    raise ValueError(
        f"obj of type {type(obj).__module__}.{type(obj).__name__} cannot be used as a linear "
        "operator; pass a probunroll LinearOperator, a torch.Tensor, a numpy array, a "
        "scipy.sparse matrix, a scipy.sparse.linalg.LinearOperator or a "
        "linear_operator.LinearOperator"
    )
