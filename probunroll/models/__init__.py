"""Latent Gaussian models behind the model interface of ``DESIGN.md``, with scikit-learn
style estimators on top."""

from probunroll.models.factor_analysis import FactorAnalysis, FactorAnalysisModel, FAPosterior

__all__ = ["FAPosterior", "FactorAnalysis", "FactorAnalysisModel"]
