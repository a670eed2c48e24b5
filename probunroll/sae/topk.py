"""TopK (with the AuxK loss on dead latents) and BatchTopK sparse autoencoders."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from probunroll.sae.base import _positive_int
from probunroll.sae.relu import LinearEncoderSAE

__all__ = ["BatchTopKSAE", "TopKSAE", "topk_activation"]


def topk_activation(h: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of ReLU(h) in each row and zero the rest."""
    vals, idx = torch.topk(h, min(k, h.shape[-1]), dim=-1)
    return torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))


class TopKSAE(LinearEncoderSAE):
    r"""TopK SAE (Gao et al. 2024): z = TopK_k(ReLU(h)), loss = ‖x − x̂‖² + α·AuxK.

    AuxK reconstructs the detached residual e = x − x̂ from the top-``aux_k`` pre-activations
    of the *dead* latents (those that have not fired for ``dead_after`` training steps):
    AuxK = ‖e − ê‖², ê = TopK_aux(h_dead) D. It is exactly zero when no latent is dead. The
    step counter is a buffer, so it is saved, resumed and (under DDP) kept in sync across
    ranks.

    Parameters
    ----------
    d, c : int
        Input dimension and number of latents.
    k : int
        Non-zeros per code; override per call with ``encode(x, k=...)``.
    aux_k : int, optional
        Dead latents used by AuxK (default d // 2, SAELens' choice).
    aux_coef : float, default 1/32
        α; 0 disables AuxK.
    dead_after : int, default 100
        Steps without firing after which a latent counts as dead.
    random_state, dtype, device
        See :class:`~probunroll.sae.ReLUSAE`.

    References
    ----------
    .. [1] L. Gao et al., "Scaling and evaluating sparse autoencoders", arXiv:2406.04093.
    """

    def __init__(
        self,
        d: int,
        c: int,
        k: int,
        aux_k: int | None = None,
        aux_coef: float = 1 / 32,
        dead_after: int = 100,
        *,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        _positive_int(k, "k")
        if k > c:
            raise ValueError(f"k={k} exceeds the number of latents c={c}")
        aux_k = max(1, d // 2) if aux_k is None else _positive_int(aux_k, "aux_k")
        if not aux_coef >= 0:
            raise ValueError(f"aux_coef must be non-negative, got {aux_coef}")
        _positive_int(dead_after, "dead_after")
        super().__init__(d, c, random_state=random_state, dtype=dtype, device=device)
        self.k, self.aux_k, self.aux_coef, self.dead_after = (
            k,
            min(aux_k, c),
            float(aux_coef),
            dead_after,
        )
        self.config.update(k=k, aux_k=aux_k, aux_coef=self.aux_coef, dead_after=dead_after)
        self.register_buffer("steps_since_fired", torch.zeros(c, dtype=torch.long, device=device))

    def _activate(self, h: Tensor, k: int | None) -> Tensor:
        return topk_activation(h, self.k if k is None else _positive_int(k, "k"))

    def encode(self, x: Tensor, k: int | None = None) -> Tensor:
        """Codes with exactly ``k`` (default ``self.k``) non-zeros per row (ties aside)."""
        return self._activate(self.pre_activations(x), k)

    @torch.no_grad()
    def _update_dead(self, z: Tensor) -> Tensor:
        fired = (z != 0).any(0).to(torch.uint8)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        self.steps_since_fired.add_(1).masked_fill_(fired.bool(), 0)
        return self.steps_since_fired > self.dead_after

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.pre_activations(x)
        z = self._activate(h, None) if not self.training else self._train_activate(h)
        x_hat = self.decode(z)
        mse = ((x - x_hat) ** 2).sum(-1).mean()
        parts = {"mse": mse, "codes": z}
        if not self.training or self.aux_coef == 0:
            return mse, parts
        dead = self._update_dead(z)
        e = (x - x_hat).detach()
        h_dead = h.masked_fill(~dead, float("-inf"))
        e_hat = topk_activation(h_dead, self.aux_k) @ self.W_dec
        aux = dead.any().to(x.dtype) * ((e - e_hat) ** 2).sum(-1).mean()
        parts["aux"] = aux
        return mse + self.aux_coef * aux, parts

    def _train_activate(self, h: Tensor) -> Tensor:
        return self._activate(h, None)


class BatchTopKSAE(TopKSAE):
    r"""BatchTopK SAE (Bussmann et al. 2024): keep the top k·B activations of the whole batch.

    ``k`` is the *average* number of non-zeros per sample. During training the buffer
    ``threshold`` tracks an exponential moving average (rate ``threshold_rate``) of the
    smallest kept activation (under DDP, its mean over the ranks' slices); in eval mode codes
    are z = ReLU(h)·1[h > θ], so inference needs no batch. Passing ``k`` to :meth:`encode`
    applies batch top-k at that k instead.

    Parameters
    ----------
    d, c, k, aux_k, aux_coef, dead_after
        See :class:`TopKSAE`.
    threshold_rate : float, default 0.01
        EMA rate of the threshold; its first update sets it directly.

    References
    ----------
    .. [1] B. Bussmann, P. Leask and N. Nanda, "BatchTopK sparse autoencoders",
       arXiv:2412.06410.
    """

    def __init__(
        self,
        d: int,
        c: int,
        k: int,
        aux_k: int | None = None,
        aux_coef: float = 1 / 32,
        dead_after: int = 100,
        threshold_rate: float = 0.01,
        *,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        if not 0 < threshold_rate <= 1:
            raise ValueError(f"threshold_rate must lie in (0, 1], got {threshold_rate}")
        super().__init__(
            d,
            c,
            k,
            aux_k,
            aux_coef,
            dead_after,
            random_state=random_state,
            dtype=dtype,
            device=device,
        )
        self.threshold_rate = float(threshold_rate)
        self.config["threshold_rate"] = self.threshold_rate
        self.register_buffer("threshold", torch.zeros((), dtype=dtype, device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))

    @staticmethod
    def batch_topk(h: Tensor, k: int) -> Tensor:
        """Keep the top k·B entries of ReLU(h) over the flattened batch."""
        flat = h.reshape(-1)
        vals, idx = torch.topk(flat, min(k * h.shape[0], flat.numel()))
        return torch.zeros_like(flat).scatter(0, idx, torch.relu(vals)).reshape(h.shape)

    def _activate(self, h: Tensor, k: int | None) -> Tensor:
        if k is not None:
            return self.batch_topk(h, _positive_int(k, "k"))
        if self.training:
            return self.batch_topk(h, self.k)
        return torch.relu(h) * (h > self.threshold).to(h.dtype)

    def _train_activate(self, h: Tensor) -> Tensor:
        z = self.batch_topk(h, self.k)
        with torch.no_grad():
            kept_min = torch.where(z > 0, z, torch.full_like(z, float("inf"))).min()
            finite = torch.isfinite(kept_min)
            # (Σ kept minimum, number of slices that kept any): under DDP every rank's slice
            # counts, not rank 0's alone (whose buffers DDP would broadcast)
            stats = torch.stack([torch.where(finite, kept_min, 0.0), finite.to(kept_min.dtype)])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(stats)
            if stats[1] > 0:  # a sync per step, training only
                rate = self.threshold_rate if int(self.threshold_updates) > 0 else 1.0
                self.threshold.lerp_((stats[0] / stats[1]).to(self.threshold.dtype), rate)
                self.threshold_updates.add_(1)
        return z
