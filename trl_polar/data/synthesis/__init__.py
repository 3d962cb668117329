"""Policy-pool synthesis of POLAR pre-training triples.

``config`` holds the settings, ``backends`` the inference engines, ``runner`` the synthesis itself and ``store`` the
on-disk format of a run (shards and manifest), which `trl_polar.data.loading` reads too.
"""

from .backends import Generation, GenerationBackend, Request, TransformersBackend, VLLMBackend
from .config import BACKENDS, INCOMPLETE_ENDINGS, OUTPUT_FORMATS, Policy, SamplingConfig, SynthesisConfig
from .runner import SynthesisResult, Synthesizer, synthesize

__all__ = [
    "BACKENDS",
    "INCOMPLETE_ENDINGS",
    "OUTPUT_FORMATS",
    "Generation",
    "GenerationBackend",
    "Policy",
    "Request",
    "SamplingConfig",
    "SynthesisConfig",
    "SynthesisResult",
    "Synthesizer",
    "TransformersBackend",
    "VLLMBackend",
    "synthesize",
]
