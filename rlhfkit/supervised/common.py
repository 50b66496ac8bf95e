"""Datums from rendered examples, and NLL / bits-per-byte of weighted logprobs (spec 2.6, 3.4)."""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np

from rlhfkit.engine.types import Datum, EncodedTextChunk, ModelInput, TensorData


def _truncate(model_input: ModelInput, length: int) -> ModelInput:
    """The first `length` tokens, keeping chunk boundaries (the last chunk may be cut); empty chunks dropped."""
    chunks, remaining = [], length
    for chunk in model_input.chunks:
        if remaining <= 0:
            break
        kept = chunk.tokens[:remaining]
        if kept:
            chunks.append(EncodedTextChunk(kept))
        remaining -= len(kept)
    return ModelInput(tuple(chunks))


def datum_from_model_input_weights(
    model_input: ModelInput, weights: Any, max_length: int | None = None, reduction: Literal["none", "mean"] = "none"
) -> Datum:
    """Truncate to max_length, shift by one (input = tokens[:-1], targets = tokens[1:], weights[1:]) and,
    with reduction "mean", scale the weights to sum to 1."""
    weights = np.asarray(weights, dtype=np.float32).reshape(-1)
    if len(weights) != model_input.length:
        raise ValueError(f"{len(weights)} weights for {model_input.length} tokens")
    if max_length is not None and model_input.length > max_length:
        model_input, weights = _truncate(model_input, max_length), weights[:max_length]
    else:
        model_input = _truncate(model_input, model_input.length)  # drops empty chunks
    tokens = model_input.to_ints()
    if len(tokens) < 2:
        raise ValueError(f"a datum needs at least 2 tokens, got {len(tokens)}")
    targets, weights = np.asarray(tokens[1:], dtype=np.int64), weights[1:].copy()
    if reduction == "mean":
        total = weights.sum()
        if total > 0:
            weights = weights / total
    elif reduction != "none":
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    return Datum(
        model_input=_truncate(model_input, len(tokens) - 1),
        loss_fn_inputs={
            "weights": TensorData.from_numpy(weights.astype(np.float32)),
            "target_tokens": TensorData.from_numpy(targets),
        },
    )


def _array(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, TensorData):
        return x.to_numpy().astype(dtype).reshape(-1)
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy() if dtype is np.float64 else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def compute_mean_nll(logprobs_list: Sequence[Any], weights_list: Sequence[Any]) -> float:
    """-sum(w * logp) / sum(w) over all datums (nan if the weights sum to 0)."""
    total, weight = 0.0, 0.0
    for logprobs, weights in zip(logprobs_list, weights_list, strict=True):
        lp, w = _array(logprobs, np.float64), _array(weights, np.float64)
        total -= float(np.dot(lp, w))
        weight += float(w.sum())
    return total / weight if weight > 0 else float("nan")


def compute_bpb(
    logprobs_list: Sequence[Any], weights_list: Sequence[Any], target_tokens_list: Sequence[Any], tokenizer: Any
) -> float:
    """Bits per UTF-8 byte of the trained text: the NLL (nats, unweighted) of target tokens with weight > 0
    that are not special tokens, over ln 2 times the byte count of those tokens decoded in contiguous runs."""
    special = set(tokenizer.all_special_ids)
    nats, n_bytes = 0.0, 0
    for logprobs, weights, targets in zip(logprobs_list, weights_list, target_tokens_list, strict=True):
        lp, w, t = _array(logprobs, np.float64), _array(weights, np.float64), _array(targets, np.int64)
        keep = (w > 0) & ~np.isin(t, list(special))
        nats -= float(lp[keep].sum())
        run: list[int] = []
        for token, k in zip(t.tolist() + [None], keep.tolist() + [False]):
            if k:
                run.append(token)
            elif run:
                n_bytes += len(tokenizer.decode(run).encode("utf-8"))
                run = []
    return nats / (math.log(2) * n_bytes) if n_bytes > 0 else float("nan")
