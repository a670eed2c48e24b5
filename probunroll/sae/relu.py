"""Vanilla ReLU sparse autoencoder with an L1 penalty."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from probunroll.sae.base import SparseAutoencoder, as_generator, random_unit_rows

__all__ = ["LinearEncoderSAE", "ReLUSAE"]


class LinearEncoderSAE(SparseAutoencoder):
    r"""Shared skeleton of the shallow SAEs: pre-activations h = (x − b_dec) W_encᵀ + b_enc.

    The decoder starts with unit-norm Gaussian atoms and the encoder at W_enc = D (so
    h = (x − b_dec) Dᵀ at init), the "tied init" of Gao et al. (2024).
    """

    def __init__(
        self,
        d: int,
        c: int,
        *,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        super().__init__(d, c, dtype=dtype, device=device)
        g = as_generator(random_state)
        D = random_unit_rows(c, d, g, dtype, device)
        self.W_dec = nn.Parameter(D)
        self.W_enc = nn.Parameter(D.clone())
        self.b_enc = nn.Parameter(torch.zeros(c, dtype=dtype, device=device))

    def pre_activations(self, x: Tensor) -> Tensor:
        """h = (x − b_dec) W_encᵀ + b_enc, shape (B, c)."""
        self._check_input(x)
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc


class ReLUSAE(LinearEncoderSAE):
    r"""ReLU SAE: z = ReLU(h), loss = ‖x − x̂‖² + λ‖z‖₁, unit-norm atoms after each step.

    Parameters
    ----------
    d, c : int
        Input dimension and number of latents.
    l1_coef : float, default 1e-2
        λ, the L1 weight.
    random_state : int, torch.Generator or None
        Seed of the initialisation.
    dtype, device
        Of the parameters.

    References
    ----------
    .. [1] H. Cunningham et al., "Sparse autoencoders find highly interpretable features in
       language models", ICLR 2024.
    """

    def __init__(
        self,
        d: int,
        c: int,
        l1_coef: float = 1e-2,
        *,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        if not l1_coef >= 0:
            raise ValueError(f"l1_coef must be non-negative, got {l1_coef}")
        super().__init__(d, c, random_state=random_state, dtype=dtype, device=device)
        self.l1_coef = float(l1_coef)
        self.config["l1_coef"] = self.l1_coef

    def encode(self, x: Tensor) -> Tensor:
        """z = ReLU(h)."""
        return torch.relu(self.pre_activations(x))

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mse, parts = super().loss(x)
        l1 = parts["codes"].abs().sum(-1).mean()
        parts["l1"] = l1
        return mse + self.l1_coef * l1, parts
