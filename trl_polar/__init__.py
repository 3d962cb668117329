"""POLAR reward models (policy discriminators) for the Hugging Face TRL ecosystem."""

from .template import PolarEncoding, PolarPairEncoding, PolarTemplate, common_prefix_length, flatten

__version__ = "0.1.0"

__all__ = ["PolarEncoding", "PolarPairEncoding", "PolarTemplate", "__version__", "common_prefix_length", "flatten"]
