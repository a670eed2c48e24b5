"""Segmentation canvases whose pixel labels need global context: filled squares labelled by
their size."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["square_sizes"]


def square_sizes(
    n_images: int,
    size: int = 24,
    sides: tuple[int, ...] = (5, 8, 12),
    max_squares: int = 2,
    random_state: int | None = 0,
) -> tuple[Tensor, Tensor]:
    """Canvases with 1 … ``max_squares`` non-touching filled squares; every pixel of a square
    is labelled with its side's class (1 … len(sides)), background 0.

    Interior and edge patches of different squares look alike locally, so a model must
    integrate information over the whole square to label it.

    Returns ``images`` (n, 1, size, size) float32 in {0, 1} and ``labels`` (n, size, size)
    int64.
    """
    if n_images < 1 or max_squares < 1:
        raise ValueError(
            f"n_images and max_squares must be positive, got {n_images}, {max_squares}"
        )
    if max(sides) + 2 > size:
        raise ValueError(f"size {size} is too small for squares of side {max(sides)}")
    rng = np.random.default_rng(random_state)
    images = np.zeros((n_images, 1, size, size), dtype=np.float32)
    labels = np.zeros((n_images, size, size), dtype=np.int64)
    for i in range(n_images):
        occupied = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(1, max_squares + 1)):
            cls = rng.integers(len(sides))
            s = sides[cls]
            for _attempt in range(50):
                r, c = rng.integers(0, size - s + 1, size=2)
                lo_r, lo_c = max(r - 1, 0), max(c - 1, 0)
                if not occupied[lo_r : r + s + 1, lo_c : c + s + 1].any():
                    occupied[r : r + s, c : c + s] = True
                    images[i, 0, r : r + s, c : c + s] = 1.0
                    labels[i, r : r + s, c : c + s] = cls + 1
                    break
    return torch.from_numpy(images), torch.from_numpy(labels)
