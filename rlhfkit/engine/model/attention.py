"""Causal self-attention for LoRA training on a CPU, as a transformers attention implementation.

The trainer runs right-padded batches without a padding mask (trainer.py), so every full-attention layer computes
plain causal self-attention. On the CPU, sdpa's fused flash kernel does that at a small fraction of the matrix
units' speed for these shapes (hidden 576 = 9 heads of 64, a few hundred tokens): in a bf16 LoRA training step of
SmolLM2-135M its forward and backward took a third of the time for a tenth of the FLOPs
(benchmarks/results/profile-training-bfloat16.md). Here the same maths runs as two batched matrix products and a
softmax: the query heads that share a key/value head are stacked along the sequence axis, so each group multiplies
its key/value head once (no copies of the key/value heads per query head), and the scores' softmax runs in fp32.

Only in bf16: in fp32 the flash kernel was the faster one (a microbenchmark of one layer's attention, and an A/B
of the training step at 0.47x, both on a machine shared with other jobs: direction only). Anything else (fp32, a mask, sliding windows, soft-capping, dropout, a query shorter than the keys, a
GPU) goes to transformers' sdpa implementation unchanged, as do models whose attention is not sdpa to begin
with."""

from __future__ import annotations

import torch

NAME = "rlhfkit_causal"
_causal_masks: dict[tuple[int, int, str, torch.dtype], torch.Tensor] = {}


def _grouped_causal_mask(length: int, groups: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[groups * length, length] additive mask (0 on and below the diagonal, -inf above) for `groups` query heads
    stacked along the sequence axis; cached per shape."""
    key = (length, groups, str(device), dtype)
    mask = _causal_masks.get(key)
    if mask is None:  # a local reference: another client's thread may clear the cache meanwhile
        if len(_causal_masks) > 64:
            _causal_masks.clear()
        mask = torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1).repeat(groups, 1)
        _causal_masks[key] = mask
    return mask


def causal_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [batch, heads, length, dim], key and value [batch, kv_heads,
    length, dim]; returns ([batch, length, heads, dim], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (
        attention_mask is None
        and not dropout
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
        and kwargs.get("position_bias") is None
        and query.device.type == "cpu"
        and query.dtype == torch.bfloat16
        and query.shape[2] == key.shape[2] > 1
        and getattr(module, "is_causal", True)
    )
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return grouped_causal_attention(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling), None


def grouped_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T · scale + causal mask) v for query [batch, heads, length, dim] and key/value [batch, kv_heads,
    length, dim] (head h reads key/value head h // (heads / kv_heads)), the softmax in fp32; returns [batch,
    length, heads, dim]. The attention probabilities are not kept for backward but computed again there
    (_GroupedCausalAttention): the same numbers, bit for bit, without 6 bytes per query-key pair and layer."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # head h uses key/value head h // groups: stack each group's query heads along the sequence axis
    q = query.reshape(batch * kv_heads, groups * length, dim)
    k = key.reshape(batch * kv_heads, length, dim)
    v = value.reshape(batch * kv_heads, length, dim)
    out = _GroupedCausalAttention.apply(q, k, v, scale, length, groups).view(batch, kv_heads, groups, length, dim)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, length, heads, dim)


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, length: int, groups: int) -> torch.Tensor:
    """The fp32 softmax of the masked scores of q [n, groups * length, dim] against k [n, length, dim]."""
    mask = _grouped_causal_mask(length, groups, q.device, q.dtype)
    # the scores in the compute dtype, mask added in the product; softmax in fp32 (transformers' eager attention
    # keeps the same precisions under autocast)
    scores = torch.baddbmm(mask.expand(q.shape[0], -1, -1), q, k.transpose(1, 2), alpha=scale)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


class _GroupedCausalAttention(torch.autograd.Function):
    """softmax(q k^T · scale + mask) v with the probabilities computed again in backward instead of saved.

    Autograd over the same three operations saved each layer's probabilities twice, in fp32 (for the softmax's
    backward) and in the compute dtype (for the product with v): 6 bytes per query-key pair, per head and layer,
    which in bf16 LoRA training of SmolLM2-135M (30 layers, 9 heads) was 405 MiB of a 1,024-token microbatch's
    1.1 GiB of saved activations, growing with the square of the row length. Here backward saves q, k and v
    (which autograd saved too), recomputes one layer's probabilities at a time, and applies the very backward
    formulas autograd applies to those operations (bmm, the cast, _softmax_backward_data, baddbmm), so outputs
    and gradients are the same bit for bit (tests/test_engine.py); the cost is the scores' product and softmax
    once more per layer in backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, length: int, groups: int):
        ctx.save_for_backward(q, k, v)
        ctx.shape = (scale, length, groups)
        return torch.matmul(_probabilities(q, k, scale, length, groups).to(v.dtype), v)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        scale, length, groups = ctx.shape
        probs32 = _probabilities(q, k, scale, length, groups)
        probs = probs32.to(v.dtype)
        grad_v = probs.transpose(1, 2).bmm(grad) if ctx.needs_input_grad[2] else None
        grad_probs = grad.bmm(v.transpose(1, 2)).to(torch.float32)
        del probs
        grad_scores = torch._softmax_backward_data(grad_probs, probs32, -1, torch.float32).to(q.dtype)
        del probs32, grad_probs
        grad_q = grad_scores.bmm(k).mul(scale) if ctx.needs_input_grad[0] else None
        grad_k = q.transpose(1, 2).bmm(grad_scores).mul(scale).transpose(1, 2) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v, None, None, None


def use_causal_attention(model: torch.nn.Module) -> None:
    """Make `model` (a transformers model computing attention with sdpa) compute plain causal attention with
    causal_attention; masks are built as for sdpa (none when a batch needs none). Other models are left as
    they are."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    if NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(NAME, causal_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
