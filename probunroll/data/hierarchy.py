"""Synthetic hierarchical concepts with known ground truth (parents and their children)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HierarchicalData", "make_hierarchy"]


@dataclass(frozen=True)
class HierarchicalData:
    """Samples and ground truth of :func:`make_hierarchy`.

    Attributes
    ----------
    x : Tensor
        (n_samples, d) observations x = z F + noise.
    features : Tensor
        (n_features, d) unit-norm ground-truth directions: the roots first, then the children
        of root 0, root 1, ...
    codes : Tensor
        (n_samples, n_features) true non-negative coefficients z.
    parent : Tensor
        (n_features,) long, the parent of each feature (−1 for roots).
    """

    x: Tensor
    features: Tensor
    codes: Tensor
    parent: Tensor

    @property
    def is_child(self) -> Tensor:
        """Bool mask of the child features."""
        return self.parent >= 0


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def make_hierarchy(
    n_samples: int = 4096,
    d: int = 32,
    n_roots: int = 8,
    branching: int = 4,
    roots_per_sample: int = 1,
    sibling_similarity: float = 0.6,
    parent_similarity: float = 0.0,
    conditionally_orthogonal: bool = True,
    noise: float = 0.01,
    random_state: int | None = 0,
    dtype: torch.dtype = torch.float32,
) -> HierarchicalData:
    r"""Two-level concept hierarchy: a child fires only with its parent, one child at a time.

    Each sample activates ``roots_per_sample`` distinct roots r (uniformly) and, for each,
    exactly one of its ``branching`` children (siblings are mutually exclusive), with
    magnitudes 1 + |N(0, 0.25²)|: x = a_r F_r + a_c F_c + σ ε.

    Children of one root share a sibling direction s_r: F_c ∝ ρ s_r + √(1 − ρ²) u_c with
    ρ = ``sibling_similarity``, so siblings are coherent (cos ≈ ρ²). With
    ``conditionally_orthogonal`` each child is then projected onto the orthogonal complement
    of its parent, ⟨F_c, F_r⟩ = 0 (the MP-SAE paper's setting): once the parent is explained,
    the child is what remains. ``parent_similarity`` γ > 0 then tilts every child towards its
    parent, F_c ∝ γ F_r + √(1 − γ²) u_c with u_c ⟂ F_r: the child atoms become coherent with
    the parent (cos = γ) while the part left after explaining the parent stays orthogonal to it.

    Parameters
    ----------
    n_samples, d : int
        Sample count and ambient dimension.
    n_roots, branching : int
        Roots and children per root (n_roots·(1 + branching) features).
    roots_per_sample : int, default 1
    sibling_similarity : float in [0, 1), default 0.6
    parent_similarity : float in [0, 1), default 0.0
    conditionally_orthogonal : bool, default True
    noise : float, default 0.01
        σ of isotropic Gaussian noise.
    random_state : int or None
    dtype : torch.dtype

    Returns
    -------
    HierarchicalData

    References
    ----------
    .. [1] V. Costa et al., "From flat to hierarchical: extracting sparse representations with
       matching pursuit", arXiv:2506.03093 (synthetic hierarchical data).
    """
    for name, v in (
        ("n_samples", n_samples),
        ("d", d),
        ("n_roots", n_roots),
        ("branching", branching),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not 1 <= roots_per_sample <= n_roots:
        raise ValueError(
            f"roots_per_sample must lie in [1, n_roots={n_roots}], got {roots_per_sample}"
        )
    if not 0 <= sibling_similarity < 1:
        raise ValueError(f"sibling_similarity must lie in [0, 1), got {sibling_similarity}")
    if not 0 <= parent_similarity < 1:
        raise ValueError(f"parent_similarity must lie in [0, 1), got {parent_similarity}")
    if not noise >= 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    g = torch.Generator()
    if random_state is None:
        g.seed()
    else:
        g.manual_seed(random_state)
    f64 = torch.float64
    roots = _unit(torch.randn(n_roots, d, generator=g, dtype=f64))
    shared = _unit(torch.randn(n_roots, 1, d, generator=g, dtype=f64))
    own = _unit(torch.randn(n_roots, branching, d, generator=g, dtype=f64))
    rho = sibling_similarity
    children = rho * shared + (1 - rho**2) ** 0.5 * own
    if conditionally_orthogonal:
        children = children - (children * roots[:, None]).sum(-1, keepdim=True) * roots[:, None]
    gamma = parent_similarity
    children = gamma * roots[:, None] + (1 - gamma**2) ** 0.5 * _unit(children)
    children = _unit(children).reshape(n_roots * branching, d)
    features = torch.cat([roots, children])
    parent = torch.cat(
        [torch.full((n_roots,), -1), torch.arange(n_roots).repeat_interleave(branching)]
    )

    n_feat = features.shape[0]
    codes = torch.zeros(n_samples, n_feat, dtype=f64)
    rows = torch.arange(n_samples)
    picks = torch.rand(n_samples, n_roots, generator=g).argsort(-1)[:, :roots_per_sample]
    for j in range(roots_per_sample):
        r = picks[:, j]
        child = n_roots + r * branching + torch.randint(0, branching, (n_samples,), generator=g)
        codes[rows, r] = 1 + 0.25 * torch.randn(n_samples, generator=g, dtype=f64).abs()
        codes[rows, child] = 1 + 0.25 * torch.randn(n_samples, generator=g, dtype=f64).abs()
    x = codes @ features + noise * torch.randn(n_samples, d, generator=g, dtype=f64)
    return HierarchicalData(x.to(dtype), features.to(dtype), codes.to(dtype), parent)
