"""probunroll: latent Gaussian models and sparse autoencoders on one batched solver core."""

from probunroll import linalg, operators, sae
from probunroll._errors import BreakdownError, NumericalWarning
from probunroll.models import (
    ClusteredMultiTaskCS,
    FactorAnalysis,
    SparseBayesianDictionaryLearning,
    SparseBayesianLearning,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "BreakdownError",
    "ClusteredMultiTaskCS",
    "FactorAnalysis",
    "NumericalWarning",
    "SparseBayesianDictionaryLearning",
    "SparseBayesianLearning",
    "__version__",
    "linalg",
    "operators",
    "sae",
]
