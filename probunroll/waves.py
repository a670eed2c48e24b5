r"""Traveling-wave recurrent networks: locally coupled damped oscillators whose spectra
integrate spatial information over time.

Jacobs, Budzinski, Muller, Ba & Keller, "Traveling Waves Integrate Spatial Information
Through Time", arXiv:2502.06034 (2025); model and readouts follow the authors' public code
(KempnerInstitute/traveling-waves-integrate, ``cornn_model2.py``).

Per pixel, encoders give a natural frequency :math:`\omega = f_\omega(x) \ge 0`, a damping
:math:`\alpha = f_\alpha(x) \ge 0` and an initial state :math:`h_0 = f_h(x)` (:math:`v_0 = 0`);
the hidden state evolves by symplectic Euler,

.. math::
    v_{t+1} = v_t + \Delta t\big(\tanh(W \star h_t) - \omega\odot h_t - \alpha\odot v_t\big),
    \qquad h_{t+1} = h_t + \Delta t\, v_{t+1},

with W a C→C 3×3 circular convolution initialised to the discrete Laplacian on each
channel: a discretised 2-D wave equation (a "drum"). A square region of size L with small
ω inside and large ω outside rings at :math:`\omega_0 \approx \sqrt2\pi/(L+1)`, so the
temporal spectrum of :math:`h_{1..T}` encodes the region's size; a per-pixel MLP reads it.

Decaying states can become float denormals (tens of times slower on CPU); the loops run
under :func:`flush_denormal`.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

__all__ = [
    "LocalCNNSegmenter",
    "WaveCell",
    "WaveSegmenter",
    "drum_fundamental",
    "flush_denormal",
    "foreground_accuracy",
    "train_segmenter",
]

_READOUTS = ("fft", "linear", "last")
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


@contextlib.contextmanager
def flush_denormal():
    """Flush float denormals to zero inside the block (per thread; restored to torch's
    default, off, afterwards)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class WaveCell(nn.Module):
    """One symplectic-Euler step of the damped, locally coupled oscillator field.

    Parameters
    ----------
    channels : int
        Hidden channels C.
    dt : float
        Time step Δt.
    learn_coupling : bool
        Train the Laplacian-initialised coupling W (else it stays the fixed Laplacian).
    """

    def __init__(self, channels: int, dt: float = 0.1, learn_coupling: bool = True) -> None:
        super().__init__()
        if dt <= 0:
            raise ValueError(f"dt must be positive, got {dt}")
        self.dt = dt
        self.coupling = nn.Conv2d(
            channels, channels, 3, padding=1, padding_mode="circular", bias=False
        )
        with torch.no_grad():
            w = torch.zeros(channels, channels, 3, 3)
            for c in range(channels):
                w[c, c] = torch.tensor(_LAPLACIAN)
            self.coupling.weight.copy_(w)
        self.coupling.weight.requires_grad_(learn_coupling)

    def forward(self, h: Tensor, v: Tensor, omega: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the next ``(h, v)``."""
        v = v + self.dt * (torch.tanh(self.coupling(h)) - omega * h - alpha * v)
        return h + self.dt * v, v


def _conv_stack(c_in: int, c_mid: int, c_out: int, n_layers: int, last: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(
            nn.Conv2d(
                c_in if i == 0 else c_mid, c_out if i == n_layers - 1 else c_mid, 3, padding=1
            )
        )
        layers.append(last if i == n_layers - 1 else nn.ReLU())
    return nn.Sequential(*layers)


def _pixel_mlp(c_in: int, hidden: int, n_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(),
        nn.Conv2d(hidden, n_classes, 1),
    )


class WaveSegmenter(nn.Module):
    """Wave-based semantic segmenter: encoders → T oscillator steps → spectral readout →
    per-pixel MLP logits.

    Parameters
    ----------
    c_in, n_classes : int
        Input channels and classes.
    channels : int
        Oscillator channels C.
    c_mid : int
        Encoder width.
    T : int
        Time steps.
    dt : float
        Time step.
    readout : {"fft", "linear", "last"}
        |rFFT| over time (K = T//2 + 1 bins), a learned T→K linear map, or the last state.
    hidden : int
        Width of the per-pixel MLP.
    """

    def __init__(
        self,
        c_in: int,
        n_classes: int,
        channels: int = 2,
        c_mid: int = 8,
        T: int = 40,
        dt: float = 0.2,
        readout: str = "fft",
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if readout not in _READOUTS:
            raise ValueError(f"readout must be one of {_READOUTS}, got {readout!r}")
        if T < 2:
            raise ValueError(f"T must be at least 2, got {T}")
        self.T, self.readout, self.channels = T, readout, channels
        self.f_omega = _conv_stack(c_in, c_mid, channels, 3, nn.ReLU())
        self.f_alpha = _conv_stack(c_in, c_mid, channels, 3, nn.ReLU())
        self.f_h = _conv_stack(c_in, c_mid, channels, 4, nn.Tanh())
        self.cell = WaveCell(channels, dt)
        K = T // 2 + 1
        if readout == "linear":
            self.time_map = nn.Linear(T, K, bias=False)
        feats = channels if readout == "last" else K * channels
        self.mlp = _pixel_mlp(feats, hidden, n_classes)

    def forward(self, x: Tensor, return_states: bool = False):
        """Per-pixel logits (B, n_classes, H, W); with ``return_states`` also the hidden
        states (B, T, C, H, W)."""
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        omega, alpha, h = self.f_omega(x), self.f_alpha(x), self.f_h(x)
        v = torch.zeros_like(h)
        states = []
        with flush_denormal():
            for _ in range(self.T):
                h, v = self.cell(h, v, omega, alpha)
                states.append(h)
        hs = torch.stack(states, 1)
        B, _, _, H, W = hs.shape
        if self.readout == "last":
            feats = hs[:, -1]
        else:
            if self.readout == "fft":
                spec = torch.fft.rfft(hs, dim=1).abs()
            else:
                spec = torch.einsum("btchw,kt->bkchw", hs, self.time_map.weight)
            feats = spec.reshape(B, -1, H, W)
        logits = self.mlp(feats)
        return (logits, hs) if return_states else logits


class LocalCNNSegmenter(nn.Module):
    """Receptive-field-matched baseline: ``n_layers`` 3×3 conv layers (field 2·n_layers + 1),
    a 1×1 conv to ``features`` channels and the same per-pixel MLP as :class:`WaveSegmenter`.
    With n_layers = 4 its field equals the wave model's encoders'."""

    def __init__(
        self,
        c_in: int,
        n_classes: int,
        n_layers: int = 4,
        c_mid: int = 16,
        features: int = 42,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be positive, got {n_layers}")
        self.body = _conv_stack(c_in, c_mid, c_mid, n_layers, nn.ReLU())
        self.proj = nn.Conv2d(c_mid, features, 1)
        self.mlp = _pixel_mlp(features, hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits (B, n_classes, H, W)."""
        return self.mlp(self.proj(self.body(x)))


def foreground_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Pixel accuracy over foreground pixels (label > 0)."""
    fg = labels > 0
    return float((logits.argmax(1)[fg] == labels[fg]).double().mean())


def train_segmenter(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 32,
    random_state: int | None = 0,
) -> list[float]:
    """Adam on per-pixel cross-entropy; returns the mean loss per epoch."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError("images and labels must have the same number of samples")
    gen = torch.Generator().manual_seed(0 if random_state is None else int(random_state))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        perm = torch.randperm(images.shape[0], generator=gen)
        total = 0.0
        for start in range(0, images.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        history.append(total / images.shape[0])
    return history


def drum_fundamental(
    sides: list[int] | tuple[int, ...],
    canvas: int = 40,
    T: int = 1500,
    dt: float = 0.1,
    omega_out: float = 20.0,
    amplitude: float = 1e-3,
) -> Tensor:
    r"""Fundamental angular frequency of a fixed-Laplacian wave cell on L×L "drums".

    ω = 0 inside each square and ``omega_out`` outside (a nearly clamped membrane);
    h₀ = ``amplitude`` inside (small, so tanh is linear), v₀ = 0. All sizes run as one
    batch; the frequency is the peak of the Hann-windowed, zero-padded spectrum of the mean
    interior displacement, refined by parabolic interpolation. Theory:
    :math:`\omega_0(L+1) \approx \sqrt2\pi`.
    """
    B = len(sides)
    if any(s + 2 > canvas for s in sides):
        raise ValueError(f"canvas {canvas} is too small for sides {sides}")
    inside = torch.zeros(B, 1, canvas, canvas, dtype=torch.float64)
    for b, s in enumerate(sides):
        o = (canvas - s) // 2
        inside[b, 0, o : o + s, o : o + s] = 1
    omega = omega_out * (1 - inside)
    cell = WaveCell(1, dt, learn_coupling=False).double()
    h, v = amplitude * inside, torch.zeros_like(inside)
    trace = []
    with torch.no_grad(), flush_denormal():
        for _ in range(T):
            h, v = cell(h, v, omega, torch.zeros_like(omega))
            trace.append((h * inside).sum((1, 2, 3)) / inside.sum((1, 2, 3)))
    sig = torch.stack(trace, 1)
    sig = (sig - sig.mean(1, keepdim=True)) * torch.hann_window(T, dtype=sig.dtype)
    n_fft = 16 * T
    P = torch.fft.rfft(sig, n=n_fft).abs()
    k = P[:, 1:].argmax(1) + 1
    a, b, c = (P.gather(1, (k + d)[:, None]).squeeze(1) for d in (-1, 0, 1))
    k = k + 0.5 * (a - c) / (a - 2 * b + c)
    return 2 * math.pi * k / (n_fft * dt)
