"""Grouped-query attention for decode steps, without copying the KV cache.

transformers' "sdpa" attention repeats each key/value head for every query head that shares it (`repeat_kv`)
whenever there is an attention mask, which sampling with left padding always has: at every decode step and
layer it copies the whole cache `num_key_value_groups` times before reading it. With one query position the
query heads of a group can instead be stacked as rows of one matmul against their shared key/value head, so
the cache is read once and never copied. Prompts (more than one query position) still go to "sdpa".

`use_grouped_decode(model)` switches a model to it; `RLHFKIT_GROUPED_DECODE=0` leaves models on "sdpa".
"""

from __future__ import annotations

import functools
import os

import torch

NAME = "rlhfkit_grouped_decode"


def grouped_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """query [B, H, Q, D], key/value [B, Hkv, L, D], mask [B, 1, Q, L] (bool: True = attend) or None.
    Returns ([B, Q, H, D], None) as transformers' attention functions do."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or kv_heads == heads or dropout or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h reads key/value head h // groups
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale  # [B, Hkv, groups, L]
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask[:, :, -1:, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, groups, D]
    return out.reshape(batch, 1, heads, dim), None


@functools.cache
def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks as "sdpa"
    assert NAME in ALL_MASK_ATTENTION_FUNCTIONS


def use_grouped_decode(model: torch.nn.Module) -> None:
    """Switch a model that uses "sdpa" and grouped-query attention to the grouped decode path (in place)."""
    config = model.config
    if os.environ.get("RLHFKIT_GROUPED_DECODE", "1") == "0" or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    if getattr(config, "num_key_value_heads", None) in (None, getattr(config, "num_attention_heads", None)):
        return
    _register()
    model.set_attn_implementation(NAME)
