"""Latent Gaussian models behind the model interface of ``DESIGN.md``, with scikit-learn
style estimators on top."""

from probunroll.models.factor_analysis import FactorAnalysis, FactorAnalysisModel, FAPosterior
from probunroll.models.sbl_dictionary import SBLDictionaryModel, SparseBayesianDictionaryLearning

__all__ = [
    "FAPosterior",
    "FactorAnalysis",
    "FactorAnalysisModel",
    "SBLDictionaryModel",
    "SparseBayesianDictionaryLearning",
]
