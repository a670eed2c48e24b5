"""Latent Gaussian models, one file each: their posterior pieces, log-likelihoods and M-steps,
with scikit-learn style estimators on top.

The interface (``base``) is what inference methods (``probunroll.inference``) talk to.
"""

from probunroll.models.base import LatentGaussianModel, LinearGaussian, PosteriorMoments
from probunroll.models.cmtcs import ClusteredMultiTaskCS, CMTCSModel
from probunroll.models.factor_analysis import FactorAnalysis, FactorAnalysisModel, FAPosterior
from probunroll.models.sbl import SBLModel, SparseBayesianLearning
from probunroll.models.sbl_dictionary import SBLDictionaryModel, SparseBayesianDictionaryLearning

__all__ = [
    "CMTCSModel",
    "ClusteredMultiTaskCS",
    "FAPosterior",
    "FactorAnalysis",
    "FactorAnalysisModel",
    "LatentGaussianModel",
    "LinearGaussian",
    "PosteriorMoments",
    "SBLDictionaryModel",
    "SBLModel",
    "SparseBayesianDictionaryLearning",
    "SparseBayesianLearning",
]
