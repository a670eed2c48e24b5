"""Archetypal SAE: atoms constrained to (a relaxation of) the convex hull of data points."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from probunroll.linalg.prox import project_simplex
from probunroll.sae.base import SparseAutoencoder, _positive_int, as_generator
from probunroll.sae.topk import topk_activation

__all__ = ["ArchetypalSAE", "kmeans"]


def kmeans(
    x: Tensor, n_clusters: int, n_iter: int = 25, random_state: int | torch.Generator | None = 0
) -> Tensor:
    """Lloyd's k-means with k-means++ seeding; returns the (n_clusters, d) centroids.

    Used to distil data into candidate points C for :class:`ArchetypalSAE`.
    """
    _positive_int(n_clusters, "n_clusters")
    if x.dim() != 2 or x.shape[0] < n_clusters:
        raise ValueError(f"x must be (n, d) with n >= n_clusters={n_clusters}")
    g = as_generator(random_state)
    centres = x[torch.randint(0, x.shape[0], (1,), generator=g)]
    for _ in range(1, n_clusters):
        d2 = torch.cdist(x, centres).min(-1).values ** 2
        probs = (d2 / d2.sum()).cpu().double()
        centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=g)]])
    for _ in range(n_iter):
        labels = torch.cdist(x, centres).argmin(-1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=n_clusters).to(x.dtype)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres


class ArchetypalSAE(SparseAutoencoder):
    r"""(Relaxed) archetypal SAE: a TopK encoder with D = (W C + Λ)·e^m.

    C (n′ × d, a buffer) holds candidate points (data or k-means centroids); W (c × n′) is
    kept row-stochastic by the exact Euclidean simplex projection after every optimizer step,
    so each atom is a convex combination of points; Λ is a relaxation with ‖Λ_i‖ ≤ δ
    (``delta=0``: atoms exactly in conv(C)); m a learned log-scale (``use_multiplier``) that
    turns the hull into a cone. The dictionary is recomputed on every access: nothing is
    cached and reading it never mutates the weights.

    Parameters
    ----------
    points : Tensor
        (n′, d) candidate points C; n′ may be smaller than c. Give them in the frame of
        x − b_dec (centred, since b_dec starts at the data mean): uncentred points leave most
        pre-activations negative and the TopK codes nearly empty.
    c : int
        Number of atoms.
    k : int
        Non-zeros per code (TopK encoder).
    delta : float, default 0.0
        Relaxation radius δ.
    use_multiplier : bool, default False
        Learn the scalar m.
    init : {"random", "identity"}, default "random"
        "random": each atom starts at a random point (without replacement when n′ ≥ c) mixed
        with a random sparse simplex perturbation; "identity": atom i = C_{i mod n′}, the
        deterministic init whose stability across runs is an artefact of the init (see the
        "Ablating Archetypes" critique).
    random_state, dtype, device
        Seed and placement.

    References
    ----------
    .. [1] T. Fel et al., "Archetypal SAE: adaptive and stable dictionary learning for concept
       extraction in large vision models", arXiv:2502.12892 (ICML 2025).
    """

    unit_norm_decoder = False

    def __init__(
        self,
        points: Tensor,
        c: int,
        k: int,
        delta: float = 0.0,
        use_multiplier: bool = False,
        init: Literal["random", "identity"] = "random",
        *,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[0] < 1:
            raise ValueError("points must be a tensor of shape (n_points, d)")
        if not bool(torch.isfinite(points).all()):
            raise ValueError("points contains NaN or Inf")
        _positive_int(k, "k")
        if k > c:
            raise ValueError(f"k={k} exceeds the number of atoms c={c}")
        if not delta >= 0:
            raise ValueError(f"delta must be non-negative, got {delta}")
        if init not in ("random", "identity"):
            raise ValueError(f"init must be 'random' or 'identity', got {init!r}")
        n, d = points.shape
        super().__init__(d, c, dtype=dtype, device=device)
        self.k, self.delta, self.use_multiplier = k, float(delta), bool(use_multiplier)
        self.config.update(
            n_points=n, k=k, delta=self.delta, use_multiplier=self.use_multiplier, init=init
        )
        self.register_buffer("points", points.detach().to(dtype=dtype, device=device).clone())
        g = as_generator(random_state)
        if init == "identity":
            W = torch.zeros(c, n, dtype=torch.float64)
            W[torch.arange(c), torch.arange(c) % n] = 1.0
        else:
            anchor = (
                torch.randperm(n, generator=g)[:c]
                if n >= c
                else torch.randint(0, n, (c,), generator=g)
            )
            logits = torch.randn(c, n, generator=g, dtype=torch.float64)
            logits[torch.arange(c), anchor] += 3.0
            W = project_simplex(logits)
        self.W = nn.Parameter(W.to(dtype=dtype, device=device))
        self.relax = nn.Parameter(torch.zeros(c, d, dtype=dtype, device=device))
        self.log_scale = nn.Parameter(
            torch.zeros((), dtype=dtype, device=device), requires_grad=self.use_multiplier
        )
        D0 = self.dictionary.detach()
        self.W_enc = nn.Parameter(D0 / D0.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        self.b_enc = nn.Parameter(torch.zeros(c, dtype=dtype, device=device))

    @property
    def dictionary(self) -> Tensor:
        """D = (W C + Λ)·e^m, (c, d)."""
        return (self.W @ self.points + self.relax) * self.log_scale.exp()

    def encode(self, x: Tensor, k: int | None = None) -> Tensor:
        self._check_input(x)
        h = (x - self.b_dec) @ self.W_enc.T + self.b_enc
        return topk_activation(h, self.k if k is None else _positive_int(k, "k"))

    @torch.no_grad()
    def project_(self) -> None:
        """W rows onto the simplex (exact projection); Λ rows into the δ-ball."""
        self.W.copy_(project_simplex(self.W))
        norms = self.relax.norm(dim=-1, keepdim=True)
        self.relax.mul_(torch.where(norms > self.delta, self.delta / norms.clamp_min(1e-30), 1.0))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ArchetypalSAE:
        cfg = dict(config)
        dtype = getattr(torch, cfg.pop("dtype"))
        points = torch.zeros(cfg.pop("n_points"), cfg.pop("d"), dtype=dtype)
        return cls(points, dtype=dtype, random_state=0, **cfg)
