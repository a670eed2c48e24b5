"""The 8 × 8 handwritten digits that ship inside scikit-learn, as torch tensors."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_digits"]


def load_digits(
    n_test: int = 297,
    random_state: int = 0,
    dtype: torch.dtype = torch.float32,
    return_labels: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split sklearn's digits (1797 × 64, pixels scaled to [0, 1]) into train and test sets.

    Parameters
    ----------
    n_test : int, default 297
        Test rows (the default leaves the 1500 training rows of ``reference/sae.md``).
    random_state : int, default 0
        Seed of the shuffle before the split.
    dtype : torch.dtype, default float32
    return_labels : bool, default False
        Also return the train and test labels.

    Returns
    -------
    (x_train, x_test) or (x_train, x_test, y_train, y_test)
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError(
            "load_digits needs scikit-learn: pip install probunroll[sklearn]"
        ) from err
    if not 0 < n_test < 1797:
        raise ValueError(f"n_test must lie in (0, 1797), got {n_test}")
    bunch = _load()
    x = torch.tensor(bunch.data, dtype=torch.float64) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(random_state))
    x, y = x[perm].to(dtype), y[perm]
    n_train = x.shape[0] - n_test
    if return_labels:
        return x[:n_train], x[n_train:], y[:n_train], y[n_train:]
    return x[:n_train], x[n_train:]
