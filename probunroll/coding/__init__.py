"""Unrolled sparse-coding models beyond SAEs: kernel similarity matching (ADMM), WLSC
structured sparse coding and linear group networks."""

from probunroll.coding.ksm import KernelSimilarityMatching, ksm_admm, ksm_objective
from probunroll.coding.wlsc import (
    WLSCAutoencoder,
    bipartite_laplacian,
    bipartite_spectral_clustering,
    wl_penalty,
)

__all__ = [
    "KernelSimilarityMatching",
    "WLSCAutoencoder",
    "bipartite_laplacian",
    "bipartite_spectral_clustering",
    "ksm_admm",
    "ksm_objective",
    "wl_penalty",
]
