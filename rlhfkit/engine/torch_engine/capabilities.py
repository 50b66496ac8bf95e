"""What a model's cache supports, so the sampling client picks its fast paths or its general path per model.

The fast paths (left-padded batches, a preallocated key/value cache written in place, prefix keys/values copied
between rows) are exact only when every layer caches the keys and values of full attention: left padding is then
masked out. A recurrent or linear-attention layer (Gated DeltaNet, Mamba, convolution states) folds every input
token into its state, pads included, and a sliding-window layer keeps only its window; such models take the
general path (equal-length prompts or right padding, the model's own cache). The record is made once per base
model by looking at the cache a two-token forward returns, never by catching errors mid-run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheCapabilities:
    layer_kinds: tuple[str, ...]  # the class name of each layer's cache
    attention_only: bool  # every layer is a plain full-attention key/value layer (transformers' DynamicLayer)
    selects_rows: bool  # the cache can keep a subset (or repeats) of its batch rows: reorder_cache(indices)


_records: dict[str, CacheCapabilities] = {}
_lock = threading.Lock()


def cache_capabilities(base_model: str, model: torch.nn.Module) -> CacheCapabilities:
    """The record for `base_model` (adapters do not change the cache), made on first use with `model`."""
    with _lock:
        if base_model not in _records:
            _records[base_model] = inspect_cache(model)
        return _records[base_model]


@torch.inference_mode()
def inspect_cache(model: torch.nn.Module) -> CacheCapabilities:
    from transformers.cache_utils import Cache, DynamicLayer

    device = next(model.parameters()).device
    cache = model(
        input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=True, logits_to_keep=1
    ).cache
    layers = list(getattr(cache, "layers", []))
    return CacheCapabilities(
        layer_kinds=tuple(type(layer).__name__ for layer in layers),
        attention_only=isinstance(cache, Cache)
        and bool(layers)
        and all(type(layer) is DynamicLayer for layer in layers),
        selects_rows=callable(getattr(cache, "reorder_cache", None)),
    )
