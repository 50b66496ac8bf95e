"""Tokenizers by model name (a local folder, a .gguf file, the embedded name, or a Hub id)."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def get_tokenizer(model_name: str) -> Any:
    """The model's Hugging Face tokenizer, loaded once per name by the engine's resolver."""
    from rlhfkit.engine import load_tokenizer

    return load_tokenizer(model_name)
