"""Matching-pursuit sparse autoencoder (MP-SAE) on the shared pursuit core."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from probunroll.linalg.pursuit import _use_gram, gram_matrix, matching_pursuit
from probunroll.sae.base import SparseAutoencoder, _positive_int, as_generator, random_unit_rows

__all__ = ["MatchingPursuitSAE"]


def _same_key(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        p is q and rest_p == rest_q for (p, *rest_p), (q, *rest_q) in zip(a, b, strict=True)
    )


class MatchingPursuitSAE(SparseAutoencoder):
    r"""MP-SAE: the encoder is T steps of matching pursuit on x − b over unit-norm atoms.

    r₀ = x − b; for t = 1..T: α = r Wᵀ, j_t = argmax |α| (``nonnegative``: argmax α with
    ReLU), z_{j_t} += a_t = α_{j_t}, r ← r − a_t D_{j_t}; x̂ = z D + b = x − r_T. Training uses
    the reconstruction loss only: sparsity comes from T. Selection is gradient-free (Gram
    matrix); codes are re-evaluated by one triangular solve, so gradients are exact and cheap
    (see :func:`probunroll.linalg.matching_pursuit`).

    Parameters
    ----------
    d, c : int
        Input dimension and number of atoms.
    k : int
        Pursuit steps T at training; override at inference with ``encode(x, k=...)``
        (adaptive sparsity: more steps never raise the residual).
    nonnegative : bool, default False
        ReLU MP (the authors' notebook) instead of signed MP.
    tied : bool, default True
        Select with D itself; ``False`` learns a separate selection matrix W.
    dropout : float, default 0.0
        Probability of dropping each atom from selection, drawn per batch in training mode
        only (from the global torch RNG).
    method : {"auto", "gram", "gather"}
        Selection path, see :func:`probunroll.linalg.mp_select`.
    random_state, dtype, device
        Initialisation seed and parameter placement.

    References
    ----------
    .. [1] V. Costa, T. Fel, E. Lubana, B. Tolooshams and D. Ba, "From flat to hierarchical:
       extracting sparse representations with matching pursuit", arXiv:2506.03093.
    """

    def __init__(
        self,
        d: int,
        c: int,
        k: int,
        nonnegative: bool = False,
        tied: bool = True,
        dropout: float = 0.0,
        method: Literal["auto", "gram", "gather"] = "auto",
        *,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        _positive_int(k, "k")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if method not in ("auto", "gram", "gather"):
            raise ValueError(f"method must be 'auto', 'gram' or 'gather', got {method!r}")
        super().__init__(d, c, dtype=dtype, device=device)
        self.k, self.nonnegative, self.tied = k, bool(nonnegative), bool(tied)
        self.dropout, self.method = float(dropout), method
        self.config.update(
            k=k, nonnegative=self.nonnegative, tied=self.tied, dropout=self.dropout, method=method
        )
        g = as_generator(random_state)
        D = random_unit_rows(c, d, g, dtype, device)
        self.W_dec = nn.Parameter(D)
        self.W_sel = None if self.tied else nn.Parameter(D.clone())
        self._gram_cache: tuple[tuple, Tensor] | None = None  # (key, D Wᵀ), eval mode only

    def _gram(self, batch: int, k: int) -> Tensor | None:
        """The selection Gram matrix D Wᵀ, cached in eval mode while the dictionary is
        unchanged; None where the pursuit takes the gather path or in training mode (where
        every optimizer step changes D, so a cache would only hold c² stale floats).

        The key is each parameter's version counter and storage address: optimizer steps,
        :meth:`project_`, ``load_state_dict`` and any other in-place update bump the
        counter. Writes through ``.data`` bypass it; call :meth:`clear_cache` after those.
        """
        if self.training or not _use_gram(self.method, k, batch, self.c):
            self._gram_cache = None
            return None
        params = (self.W_dec,) if self.W_sel is None else (self.W_dec, self.W_sel)
        # the parameter objects themselves are part of the key (compared by identity), so a
        # replaced parameter never matches a freed one's address and version
        key = tuple((p, p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        cached = self._gram_cache
        if cached is None or not _same_key(cached[0], key):
            self._gram_cache = cached = (key, gram_matrix(self.W_dec, self.W_sel))
        return cached[1]

    def clear_cache(self) -> None:
        """Drop the cached Gram matrix (needed only after writes through ``.data``)."""
        self._gram_cache = None

    def pursuit(
        self,
        x: Tensor,
        k: int | None = None,
        tol: float | None = None,
        coef_threshold: float | None = None,
    ):
        """Run MP on x − b; returns :class:`probunroll.linalg.PursuitResult`."""
        self._check_input(x)
        k = self.k if k is None else _positive_int(k, "k")
        mask = None
        if self.training and self.dropout > 0:
            mask = torch.rand(self.c, device=x.device) >= self.dropout
        return matching_pursuit(
            x - self.b_dec, self.W_dec, k, tol, self.nonnegative,
            selector=self.W_sel, coef_threshold=coef_threshold, atom_mask=mask,
            method=self.method, gram=self._gram(x.shape[0], k),
        )  # fmt: skip

    def encode(
        self,
        x: Tensor,
        k: int | None = None,
        tol: float | None = None,
        coef_threshold: float | None = None,
    ) -> Tensor:
        """Codes after ``k`` steps (default: the training k), or fewer per sample when
        ‖r‖² ≤ tol·‖x − b‖² or the next coefficient falls below ``coef_threshold``."""
        return self.pursuit(x, k, tol, coef_threshold).codes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_hat, codes)`` with x̂ = x − r_T: the pursuit's own sparse decode
        b + Σ_t a_t D_{j_t}, equal to ``decode(codes)`` without its dense (B × c) product."""
        res = self.pursuit(x)
        return x - res.residual, res.codes

    @torch.no_grad()
    def project_(self) -> None:
        super().project_()
        if self.W_sel is not None:
            self.W_sel.div_(self.W_sel.norm(dim=-1, keepdim=True).clamp_min(1e-12))
