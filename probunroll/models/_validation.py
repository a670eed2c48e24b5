"""Input checks shared by the estimators: each raises ``ValueError`` naming the argument,
before any work, and never modifies its input."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from probunroll.operators import as_operator


def resolve_dtype(dtype: torch.dtype | None, *arrays: Any) -> torch.dtype:
    """``dtype`` if given, else the first floating dtype among ``arrays``, else float64."""
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    for arr in arrays:
        if isinstance(arr, Tensor) and arr.is_floating_point():
            return arr.dtype
        if isinstance(arr, np.ndarray) and arr.dtype in (np.float32, np.float64):
            return torch.float32 if arr.dtype == np.float32 else torch.float64
    return torch.float64


def resolve_device(device: torch.device | str | None, *arrays: Any) -> torch.device:
    """``device`` if given, else that of the first tensor among ``arrays``, else the CPU."""
    if device is not None:
        return torch.device(device)
    for arr in arrays:
        if isinstance(arr, Tensor):
            return arr.device
    return torch.device("cpu")


def as_data_matrix(
    name: str,
    X: Any,
    dtype: torch.dtype,
    device: torch.device,
    *,
    allow_nan: bool = False,
    min_samples: int = 1,
) -> Tensor:
    """A data matrix ``X`` (n_samples, n_features) as a tensor in ``dtype`` on ``device``.

    It may share memory with ``X`` and must only be read. Raises ``ValueError`` (scikit-learn's
    wording, so that its estimator checks and users see the familiar messages) for sparse,
    complex or non-numeric input, any other shape than 2-D, no feature, fewer than
    ``min_samples`` rows, Inf, and NaN unless ``allow_nan`` (NaN = a missing entry).
    """
    if hasattr(X, "toarray") and hasattr(X, "nnz"):  # scipy.sparse, without importing it
        raise ValueError(
            f"{name}: sparse input is not supported; pass a dense array ({name}.toarray())"
        )
    if isinstance(X, Tensor):
        if X.is_complex():
            raise ValueError(f"{name}: Complex data not supported")
        t = X.detach().to(device=device, dtype=dtype)
    else:
        arr = np.asarray(X)
        if np.iscomplexobj(arr):
            raise ValueError(f"{name}: Complex data not supported")
        try:
            arr = arr.astype(np.float64, copy=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a 2-D array of numbers: {err}") from None
        t = torch.as_tensor(arr).to(device=device, dtype=dtype)
    if t.ndim != 2:
        hint = (
            f"; Reshape your data with {name}.reshape(-1, 1) for one feature or "
            f"{name}.reshape(1, -1) for one sample"
            if t.ndim == 1
            else ""
        )
        raise ValueError(
            f"{name} must be 2-D (n_samples, n_features), got shape {tuple(t.shape)}{hint}"
        )
    n, features = t.shape
    if features < 1:
        raise ValueError(
            f"{name}: 0 feature(s) (shape={tuple(t.shape)}) while a minimum of 1 is required."
        )
    if n < min_samples:
        raise ValueError(
            f"{name} must have at least {min_samples} sample{'s' if min_samples > 1 else ''}, "
            f"got n_samples = {n} (shape={tuple(t.shape)})"
        )
    if allow_nan:
        if bool(torch.isinf(t).any()):
            raise ValueError(f"{name} contains Inf (use NaN to mark missing entries)")
    elif not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite: it contains NaN or Inf")
    return t


def as_float_tensor(name: str, value: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value`` as a floating tensor (a copy only where a conversion is needed)."""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be array-like, got {type(value).__name__}") from err
    if tensor.is_complex():
        raise ValueError(f"{name} must be real, got a complex array")
    return tensor.to(dtype=dtype, device=device)


def resolve_operator(name: str, value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """An operator for ``value`` (tensor, ndarray, scipy.sparse or operator), finite if dense."""
    if isinstance(value, (Tensor, np.ndarray)):
        matrix = as_float_tensor(name, value, dtype, device)
        if matrix.dim() != 2:
            raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            raise ValueError(f"{name} contains NaN or Inf")
        value = matrix
    try:
        op = as_operator(value, dtype=dtype, device=device)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a matrix or a linear operator: {err}") from err
    return op


def check_data(
    name: str,
    y: Tensor,
    n_rows: int,
    mask: Any,
    mask_name: str,
    ndims: tuple[int, ...],
) -> Tensor | None:
    """Check ``y`` against the operator's ``n_rows`` and its mask; return the mask as a float
    tensor (or None). NaN/Inf are allowed only where the mask marks entries missing."""
    if y.dim() not in ndims:
        raise ValueError(
            f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape "
            f"{tuple(y.shape)}"
        )
    if y.shape[-1] != n_rows:
        raise ValueError(
            f"{name} has {y.shape[-1]} entries per vector but the operator has {n_rows} rows"
        )
    mask_t = None
    observed = torch.ones_like(y, dtype=torch.bool)
    if mask is not None:
        mask_t = torch.as_tensor(mask, device=y.device)
        if mask_t.shape != y.shape:
            raise ValueError(
                f"{mask_name} has shape {tuple(mask_t.shape)}, expected {tuple(y.shape)} "
                f"(the shape of {name})"
            )
        if not ((mask_t == 0) | (mask_t == 1)).all():
            raise ValueError(f"{mask_name} must hold only 0/1 or booleans")
        observed = mask_t.bool()
        empty = (~observed).all(-1)
        if empty.any():
            rows = torch.nonzero(empty.reshape(-1)).flatten().tolist()
            raise ValueError(f"{mask_name} has rows with no observed entry: {rows}")
        mask_t = observed.to(y.dtype)
    if not torch.isfinite(y[observed]).all():
        raise ValueError(f"{name} contains NaN or Inf at observed entries")
    return mask_t


def check_positive(name: str, value: float | None) -> None:
    """``value`` is None or a finite positive number."""
    if value is None:
        return
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """``value`` is an integer ≥ ``minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def make_generator(random_state: Any, device: torch.device) -> torch.Generator:
    """A seeded ``torch.Generator`` on ``device`` (``None``: seeded from the OS)."""
    if isinstance(random_state, torch.Generator):
        return random_state
    generator = torch.Generator(device=device)
    if random_state is None:
        generator.seed()
    else:
        check_int("random_state", random_state, minimum=0)
        generator.manual_seed(int(random_state))
    return generator


def check_cuda_graph(cuda_graph: Any, method: str, device: torch.device) -> None:
    """``cuda_graph`` of a stochastic estimator: a bool, only for ``"gradient_em"`` or
    ``"unrolled"``, and only on a CUDA device."""
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    if cuda_graph and method == "em":
        raise ValueError("cuda_graph=True applies to method='gradient_em' or 'unrolled'")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")


def check_clip_spikes(clip_spikes: Any, method: str) -> None:
    """``clip_spikes`` is None or a number > 1, and only for the stochastic methods."""
    from probunroll.inference.stochastic import check_clip_spikes as check_value

    check_value(clip_spikes)
    if clip_spikes is not None and method == "em":
        raise ValueError("clip_spikes (gradient clipping) is for the stochastic methods, not em")


def check_restore_best(restore_best: Any, method: str, methods: tuple[str, ...]) -> None:
    """``restore_best`` is a bool, and True only for one of ``methods``."""
    if not isinstance(restore_best, bool):
        raise ValueError(f"restore_best must be True or False, got {restore_best!r}")
    if restore_best and method not in methods:
        raise ValueError(f"restore_best is for the methods {methods}, not {method!r}")
