"""The engine: the only layer that touches torch. It offers the reference service's primitives
(see docs/engine-api.md); recipes are written against these names only."""

from rlhfkit.engine import types
from rlhfkit.engine.futures import APIFuture
from rlhfkit.engine.models import ModelNotFoundError, load_tokenizer, resolve_base_model
from rlhfkit.engine.sampling import SamplingClient
from rlhfkit.engine.service import ServiceClient
from rlhfkit.engine.training import TrainingClient
from rlhfkit.engine.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ModelInput,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    TensorData,
)

__all__ = [
    "types",
    "APIFuture",
    "ServiceClient",
    "TrainingClient",
    "SamplingClient",
    "ModelNotFoundError",
    "load_tokenizer",
    "resolve_base_model",
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "ModelInput",
    "SampledSequence",
    "SampleResponse",
    "SamplingParams",
    "TensorData",
]
