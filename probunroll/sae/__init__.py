"""Sparse autoencoders built on the solver core: shallow baselines (ReLU, TopK, BatchTopK,
JumpReLU), matching-pursuit SAE, SpaDE and archetypal SAE; one trainer, metrics, save/load."""

from probunroll.sae import metrics
from probunroll.sae.archetypal import ArchetypalSAE, kmeans
from probunroll.sae.base import SparseAutoencoder
from probunroll.sae.demo import demo
from probunroll.sae.io import load, save
from probunroll.sae.jumprelu import JumpReLUSAE
from probunroll.sae.mp import MatchingPursuitSAE
from probunroll.sae.relu import ReLUSAE
from probunroll.sae.spade import SpaDE
from probunroll.sae.topk import BatchTopKSAE, TopKSAE
from probunroll.sae.train import train

__all__ = [
    "ArchetypalSAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "MatchingPursuitSAE",
    "ReLUSAE",
    "SpaDE",
    "SparseAutoencoder",
    "TopKSAE",
    "demo",
    "kmeans",
    "load",
    "metrics",
    "save",
    "train",
]
