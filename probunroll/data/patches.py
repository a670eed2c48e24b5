"""Natural-image patches from images shipped inside installed packages (scikit-image),
with a generated dead-leaves fallback; nothing is downloaded."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["dead_leaves", "natural_images", "natural_patches", "whiten_image", "zca_whiten"]

_SKIMAGE_IMAGES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins")


def dead_leaves(size: int = 256, n_discs: int = 3000, random_state: int | None = 0) -> np.ndarray:
    """Dead-leaves image (occluding discs, power-law radii, random grey levels) in [0, 1].

    Its statistics (edges, roughly 1/f² power) stand in for natural images when
    scikit-image is missing."""
    rng = np.random.default_rng(random_state)
    img = np.full((size, size), 0.5)
    yy, xx = np.mgrid[:size, :size]
    radii = size * 0.01 / rng.uniform(0.02, 1.0, n_discs) ** 0.7
    for r, cy, cx, v in zip(
        np.minimum(radii, size / 4),
        rng.uniform(0, size, n_discs),
        rng.uniform(0, size, n_discs),
        rng.uniform(0, 1, n_discs),
        strict=True,
    ):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = v
    return img


def natural_images(source: str = "skimage") -> list[np.ndarray]:
    """Greyscale images in [0, 1] shipped with scikit-image (``source="skimage"``) or
    scikit-learn's ``load_sample_images`` (``"sklearn"``: china and flower, needs Pillow);
    dead-leaves images if the package is missing."""
    if source not in ("skimage", "sklearn"):
        raise ValueError(f"source must be 'skimage' or 'sklearn', got {source!r}")
    try:
        from skimage.color import rgb2gray

        if source == "sklearn":
            from sklearn.datasets import load_sample_images

            raw = list(load_sample_images().images)
        else:
            import skimage.data as skd

            raw = [getattr(skd, name)() for name in _SKIMAGE_IMAGES]
    except ImportError:
        return [dead_leaves(random_state=s) for s in range(3)]
    out = []
    for img in raw:
        img = np.asarray(img, dtype=np.float64) / 255.0
        out.append(rgb2gray(img) if img.ndim == 3 else img)
    return out


def whiten_image(img: np.ndarray, f0: float = 0.4) -> np.ndarray:
    r"""Whiten a whole image with the Olshausen & Field (1997) filter
    :math:`R(f) = f\,e^{-(f/f_0)^4}` (f in cycles/pixel): the ramp flattens the
    :math:`1/f^2` spectrum and the quartic roll-off suppresses the noise and aliasing near
    Nyquist that full-band patch whitening amplifies. Returns unit variance."""
    h, w = img.shape
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    out = np.real(np.fft.ifft2(np.fft.fft2(img - img.mean()) * f * np.exp(-((f / f0) ** 4))))
    return out / out.std()


def zca_whiten(P: np.ndarray, eps: float = 1e-2) -> np.ndarray:
    r"""ZCA whitening :math:`U(\Lambda + \epsilon\bar\lambda I)^{-1/2}U^\top` of centred rows;
    ``eps`` is relative to the mean eigenvalue (it damps the high-frequency noise)."""
    P = P - P.mean(0)
    evals, evecs = np.linalg.eigh(P.T @ P / P.shape[0])
    W = evecs @ np.diag(1.0 / np.sqrt(evals + eps * evals.mean())) @ evecs.T
    return P @ W


def natural_patches(
    patch: int = 8,
    n_patches: int = 20000,
    whiten: bool | str = True,
    random_state: int | None = 0,
    images: list[np.ndarray] | None = None,
) -> Tensor:
    """Random ``patch``×``patch`` patches, DC removed, optionally whitened and scaled to
    unit variance per pixel; returns a float32 tensor (n_patches, patch²).

    ``whiten``: ``True``/``"zca"`` ZCA-whitens the patches (:func:`zca_whiten`);
    ``"image"`` whitens each whole image first (:func:`whiten_image`, the classical
    sparse-coding preprocessing); ``False`` leaves them unwhitened."""
    if patch < 2 or n_patches < 1:
        raise ValueError(f"patch must be ≥ 2 and n_patches ≥ 1, got {patch}, {n_patches}")
    if whiten not in (True, False, "zca", "image"):
        raise ValueError(f"whiten must be a bool, 'zca' or 'image', got {whiten!r}")
    rng = np.random.default_rng(random_state)
    images = natural_images() if images is None else images
    if whiten == "image":
        images = [whiten_image(img) for img in images]
    which = rng.integers(len(images), size=n_patches)
    out = np.empty((n_patches, patch * patch))
    for i, w in enumerate(which):
        img = images[w]
        r = rng.integers(img.shape[0] - patch + 1)
        c = rng.integers(img.shape[1] - patch + 1)
        out[i] = img[r : r + patch, c : c + patch].ravel()
    out -= out.mean(1, keepdims=True)
    if whiten is True or whiten == "zca":
        out = zca_whiten(out)
    out /= out.std()
    return torch.as_tensor(out, dtype=torch.float32)
