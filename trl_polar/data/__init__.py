"""POLAR data: prompt sampling, policy-pool synthesis of pre-training triples, and converters of public formats.

See docs/data.md. Importing this package loads neither torch nor transformers; the functions that need them do.
"""

from .converters import FORMATS, Conversion, ConversionResult, ConvertOptions, convert
from .io import DataError, read_records, read_rows, write_rows
from .prompts import PromptConfig, PromptSet, sample_prompts
from .synthesis import (
    Generation,
    GenerationBackend,
    Policy,
    Request,
    SamplingConfig,
    SynthesisConfig,
    SynthesisResult,
    Synthesizer,
    TransformersBackend,
    VLLMBackend,
    synthesize,
)
from .trimming import find_loop, trim_incomplete_ending, trim_loop

__all__ = [
    "FORMATS",
    "Conversion",
    "ConversionResult",
    "ConvertOptions",
    "DataError",
    "Generation",
    "GenerationBackend",
    "Policy",
    "PromptConfig",
    "PromptSet",
    "Request",
    "SamplingConfig",
    "SynthesisConfig",
    "SynthesisResult",
    "Synthesizer",
    "TransformersBackend",
    "VLLMBackend",
    "convert",
    "find_loop",
    "read_records",
    "read_rows",
    "sample_prompts",
    "synthesize",
    "trim_incomplete_ending",
    "trim_loop",
    "write_rows",
]
