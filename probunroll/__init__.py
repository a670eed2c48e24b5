"""probunroll: latent Gaussian models and sparse autoencoders on one batched solver core."""

from probunroll import linalg, sae
from probunroll._errors import BreakdownError, NumericalWarning

__version__ = "0.1.0.dev0"

__all__ = ["BreakdownError", "NumericalWarning", "__version__", "linalg", "sae"]
