"""JumpReLU sparse autoencoder with straight-through pseudo-derivatives."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from probunroll.sae.relu import LinearEncoderSAE

__all__ = ["JumpReLUSAE", "jumprelu", "step"]


def _rect(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return h * (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_h = g * (h > theta).to(g.dtype)
        grad_theta = g * (-(theta / eps) * _rect((h - theta) / eps))
        return grad_h, _sum_to(grad_theta, theta.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = g * (-(1 / eps) * _rect((h - theta) / eps))
        return torch.zeros_like(h), _sum_to(grad_theta, theta.shape), None


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    while t.dim() > len(shape):
        t = t.sum(0)
    return t


def jumprelu(h: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    r"""JumpReLU z = h·H(h − θ) with the straight-through pseudo-derivative

    .. math:: \frac{\partial z}{\partial\theta} := -\frac{\theta}{\varepsilon}
              K\!\left(\frac{h - \theta}{\varepsilon}\right),\qquad
              \frac{\partial z}{\partial h} = H(h - \theta),

    with K the rectangle kernel on [−½, ½] and ε the bandwidth (Rajamanoharan et al. 2024).
    """
    return _JumpReLU.apply(h, theta, bandwidth)


def step(h: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    r"""Heaviside H(h − θ) with :math:`\partial H/\partial\theta :=
    -\tfrac{1}{\varepsilon}K((h-\theta)/\varepsilon)` and no gradient to h."""
    return _Step.apply(h, theta, bandwidth)


class JumpReLUSAE(LinearEncoderSAE):
    r"""JumpReLU SAE: z = h·H(h − θ), θ = exp(log θ) > 0 per latent.

    Loss = ‖x − x̂‖² + λ·S, where S = mean_b Σ_i H(h_i − θ_i) (the L0), or, with
    ``target_l0`` set, S = (L0/target − 1)² (the L0-target form of the MP-SAE authors'
    notebook). Gradients reach θ only through the pseudo-derivatives of :func:`jumprelu`
    and :func:`step`.

    Parameters
    ----------
    d, c : int
        Input dimension and number of latents.
    sparsity_coef : float, default 1e-2
        λ.
    bandwidth : float, default 0.05
        ε of the rectangle kernel.
    threshold_init : float, default 0.01
        θ₀.
    target_l0 : float, optional
        Switch to the L0-target penalty.
    random_state, dtype, device
        See :class:`~probunroll.sae.ReLUSAE`.

    References
    ----------
    .. [1] S. Rajamanoharan et al., "Jumping ahead: improving reconstruction fidelity with
       JumpReLU sparse autoencoders", arXiv:2407.14435.
    """

    def __init__(
        self,
        d: int,
        c: int,
        sparsity_coef: float = 1e-2,
        bandwidth: float = 0.05,
        threshold_init: float = 0.01,
        target_l0: float | None = None,
        *,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        if not sparsity_coef >= 0:
            raise ValueError(f"sparsity_coef must be non-negative, got {sparsity_coef}")
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        if not threshold_init > 0:
            raise ValueError(f"threshold_init must be positive, got {threshold_init}")
        if target_l0 is not None and not target_l0 > 0:
            raise ValueError(f"target_l0 must be positive, got {target_l0}")
        super().__init__(d, c, random_state=random_state, dtype=dtype, device=device)
        self.sparsity_coef, self.bandwidth = float(sparsity_coef), float(bandwidth)
        self.target_l0 = target_l0
        self.config.update(
            sparsity_coef=self.sparsity_coef,
            bandwidth=self.bandwidth,
            threshold_init=float(threshold_init),
            target_l0=target_l0,
        )
        self.log_threshold = nn.Parameter(
            torch.full((c,), math.log(threshold_init), dtype=dtype, device=device)
        )

    @property
    def threshold(self) -> Tensor:
        """θ = exp(log θ), (c,)."""
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        return jumprelu(self.pre_activations(x), self.threshold, self.bandwidth)

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.pre_activations(x)
        theta = self.threshold
        z = jumprelu(h, theta, self.bandwidth)
        mse = ((x - self.decode(z)) ** 2).sum(-1).mean()
        l0 = step(h, theta, self.bandwidth).sum(-1).mean()
        penalty = l0 if self.target_l0 is None else (l0 / self.target_l0 - 1) ** 2
        return mse + self.sparsity_coef * penalty, {"mse": mse, "codes": z, "l0": l0}
