"""The engine: the only layer that touches torch. It offers the reference service's primitives
(see docs/engine-api.md); recipes are written against these names only.

The names below are resolved on first use (PEP 562), so importing a torch-free part of the engine
(`rlhfkit.engine.settings`, `rlhfkit.engine.types`, the vLLM environment's side) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "APIFuture": "rlhfkit.engine.futures",
    "EngineSettings": "rlhfkit.engine.settings",
    "ModelNotFoundError": "rlhfkit.engine.model.base",
    "load_tokenizer": "rlhfkit.engine.model.base",
    "resolve_base_model": "rlhfkit.engine.model.base",
    "SamplingClient": "rlhfkit.engine.clients",
    "ServiceClient": "rlhfkit.engine.service",
    "TrainingClient": "rlhfkit.engine.clients",
    **dict.fromkeys(
        (
            "AdamParams",
            "Datum",
            "EncodedTextChunk",
            "ForwardBackwardOutput",
            "ModelInput",
            "SampledSequence",
            "SampleResponse",
            "SamplingParams",
            "TensorData",
        ),
        "rlhfkit.engine.types",
    ),
}

__all__ = ["types", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "types":
        return importlib.import_module("rlhfkit.engine.types")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhfkit.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
