"""Unrolled sparse-coding models beyond SAEs: kernel similarity matching (ADMM), WLSC
structured sparse coding and linear group networks."""

from probunroll.coding.ksm import KernelSimilarityMatching, ksm_admm, ksm_objective

__all__ = ["KernelSimilarityMatching", "ksm_admm", "ksm_objective"]
