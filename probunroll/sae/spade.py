"""SpaDE: the sparsemax distance encoder."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probunroll.linalg.prox import sparsemax
from probunroll.sae.base import SparseAutoencoder, as_generator

__all__ = ["SpaDE"]


class SpaDE(SparseAutoencoder):
    r"""Sparsemax Distance Encoder: codes on the simplex from distances to prototypes.

    .. math:: z = \operatorname{sparsemax}(-\lambda\,[\lVert \tilde x - P_k\rVert^2]_k)
              = \operatorname{sparsemax}(\lambda(2\tilde x P^\top - \lVert P_k\rVert^2)),
              \qquad \tilde x = x - b_{\mathrm{dec}},

    the second (affine) form by shift invariance of sparsemax, so no B × c × d distance
    tensor is formed. λ = softplus(λ_raw) > 0 is learned (initialised to 1/(2d)); larger λ
    gives sparser codes (λ → ∞: nearest prototype). The decoder is x̂ = z D + b_dec with D
    initialised at P; codes sum to one, so centre and scale the inputs.

    Parameters
    ----------
    d, c : int
        Input dimension and number of prototypes / latents.
    scale_init : float, optional
        Initial λ (default 1/(2d)).
    learn_scale : bool, default True
        Whether λ is trained.
    random_state, dtype, device
        Prototypes start as N(0, I) draws.

    References
    ----------
    .. [1] S. Hindupur, E. Lubana, T. Fel and D. Ba, "Projecting assumptions: the duality
       between sparse autoencoders and concept geometry", arXiv:2503.01822.
    """

    unit_norm_decoder = False

    def __init__(
        self,
        d: int,
        c: int,
        scale_init: float | None = None,
        learn_scale: bool = True,
        *,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        scale_init = 1 / (2 * d) if scale_init is None else scale_init
        if not scale_init > 0:
            raise ValueError(f"scale_init must be positive, got {scale_init}")
        super().__init__(d, c, dtype=dtype, device=device)
        self.config.update(scale_init=float(scale_init), learn_scale=bool(learn_scale))
        g = as_generator(random_state)
        P = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        self.prototypes = nn.Parameter(P)
        self.W_dec = nn.Parameter(P.clone())
        raw = torch.tensor(scale_init + math.log(-math.expm1(-scale_init)), dtype=dtype)
        self.scale_raw = nn.Parameter(raw.to(device), requires_grad=bool(learn_scale))

    @property
    def scale(self) -> Tensor:
        """λ = softplus(λ_raw)."""
        return F.softplus(self.scale_raw)

    def encode(self, x: Tensor) -> Tensor:
        self._check_input(x)
        P = self.prototypes
        v = self.scale * (2 * (x - self.b_dec) @ P.T - (P * P).sum(-1))
        return sparsemax(v)

    @torch.no_grad()
    def init_from_data_(self, x: Tensor, generator: torch.Generator) -> None:
        """b_dec at the mean; prototypes and atoms at randomly chosen centred data points."""
        super().init_from_data_(x, generator)
        idx = torch.randint(0, x.shape[0], (self.c,), generator=generator).to(x.device)
        pts = x[idx] - self.b_dec
        self.prototypes.copy_(pts)
        self.W_dec.copy_(pts)
