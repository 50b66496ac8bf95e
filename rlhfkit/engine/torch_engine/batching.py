"""Padding and microbatching of token sequences (shared by training and scoring)."""

from __future__ import annotations

from typing import Sequence

import torch


def microbatch_token_budget(
    device: torch.device | str | None = None, training: bool = False, configured: int | None = None
) -> int:
    """Padded tokens per forward pass: 512 when training on a CPU, else 4096; `configured`
    (EngineSettings.microbatch_tokens) overrides. On the CPU smaller passes train faster per token (benchmarks/README.md:
    1024 against 2048 and 4096, in one process, alternating), most likely because their activations are reused from
    the allocator's heap instead of being mapped and zeroed afresh at every pass; 512 against 1024 (bf16 SmolLM2,
    4 rows of 200-256 tokens, alternating): as fast (medians 3.18 vs 3.29 s a step), and a step's resident memory
    0.37 GiB lower (1.57 vs 1.94 GiB at the first step's peak; benchmarks/results/memory-demo.md)."""
    if configured:
        return int(configured)
    on_cpu = device is None or torch.device(device).type == "cpu"
    return 512 if training and on_cpu else 4096


MICROBATCH_OVERHEAD_TOKENS = 128  # what one more forward pass costs, in padded tokens (fixed per-pass work)


def plan_microbatches(lengths: Sequence[int], budget: int, multiple: int = 1) -> list[list[int]]:
    """Group indices into microbatches of similar length whose padded size (rows × padded width) stays within
    the token budget, with as little padding as possible: the sequences are sorted longest first and cut into
    consecutive runs so that the padded tokens plus MICROBATCH_OVERHEAD_TOKENS per microbatch are least (an
    exact dynamic programme over the cut points). Padded positions cost as much as real ones in every
    matrix product, so a short sequence is not padded to a long one when a pass of its own is cheaper. The
    padded width is the longest length rounded up to `multiple` (padded_width), as the pass will pad it: the
    budget bounds the rounded pass (a single sequence longer than the budget still gets a pass of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    sizes = [padded_width([max(int(lengths[i]), 1)], multiple) for i in order]
    n = len(sizes)
    best = [0.0] + [float("inf")] * n  # best[i]: least cost of the first i sequences
    cut = [0] * (n + 1)
    for j in range(n):  # a microbatch starting at j (its longest sequence is sizes[j])
        for i in range(j + 1, n + 1):
            padded = (i - j) * sizes[j]
            if padded > budget and i > j + 1:
                break
            cost = best[j] + padded + MICROBATCH_OVERHEAD_TOKENS
            if cost < best[i]:
                best[i], cut[i] = cost, j
    batches: list[list[int]] = []
    i = n
    while i > 0:
        batches.append(order[cut[i] : i])
        i = cut[i]
    return batches[::-1]


SHAPE_MULTIPLE = 16  # tokens: padded widths on a CPU in bf16/fp16 are multiples of this (shape_multiple)


def shape_multiple(device: torch.device, compute_dtype: torch.dtype) -> int:
    """What padded widths are rounded up to: SHAPE_MULTIPLE on a CPU computing in bf16 or fp16, else 1.

    There each matrix product of a new shape makes oneDNN build (JIT-compile) and cache kernels of its own, and
    what they hold stays resident: measured (torch 2.13.0+cpu, Intel Xeon with avx512_bf16, two bf16 linear
    layers 576 -> 1536 -> 576, forward + backward over 600 row counts 100-699) 1.43 GB resident at the end
    (894 MB after malloc_trim) against 299 MB in fp32; rounding the row count up to a multiple of 16: 375 MB, and
    the loop took 20.6 s instead of 27.0 s (building the kernels cost more than the padding). The engine's row
    lengths vary from pass to pass (every microbatch is as wide as its longest row), so without rounding the
    RL stage's resident memory climbed by ~90 MiB an iteration (SmolLM2, bf16: 1.17 -> 1.95 GiB between passes
    over 9 iterations while the tensors alive stayed ~0.5 GiB). In fp32 and on GPUs there is no such cost, and
    widths stay as they are (outputs there are unchanged bit for bit)."""
    on_cpu = torch.device(device).type == "cpu"
    return SHAPE_MULTIPLE if on_cpu and compute_dtype in (torch.bfloat16, torch.float16) else 1


def padded_width(lengths: Sequence[int], multiple: int = 1) -> int:
    """The longest length, rounded up to a multiple of `multiple`."""
    return -(-max(lengths) // multiple) * multiple


def pad_right(
    sequences: Sequence[Sequence[int]], pad_id: int, device, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to padded_width(..., multiple)."""
    width = padded_width([len(s) for s in sequences], multiple)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def pad_left(
    sequences: Sequence[Sequence[int]], pad_id: int, device, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), left-padded so every sequence ends at the last column, to
    padded_width(..., multiple)."""
    width = padded_width([len(s) for s in sequences], multiple)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


LOGPROB_CHUNK_BYTES = 8 << 20  # fp32 logits converted at a time: a few MB stay in the CPU's caches


class _TargetLogprobs(torch.autograd.Function):
    """log softmax(logits)[target] for each row of 2-D logits, in fp32 whatever the logits' dtype, a few rows at a
    time: neither pass materialises an fp32 copy of the whole [rows, vocabulary] logits (forward keeps one
    log-sum-exp per row; backward writes softmax - onehot straight into a gradient of the logits' own dtype).
    With a 49k vocabulary that copy, its log-softmax and their gradients were passes over hundreds of MB per
    1,024 trained tokens."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = max(1, LOGPROB_CHUNK_BYTES // (4 * logits.shape[-1]))
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            lse[start : start + rows] = torch.logsumexp(logits[start : start + rows].float(), dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return logits.gather(1, targets[:, None]).squeeze(1).float() - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad = grad.float()
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            end = start + ctx.rows
            part = torch.exp(logits[start:end].float() - lse[start:end, None]).mul_(-grad[start:end, None])
            part.scatter_add_(1, targets[start:end, None], grad[start:end, None])
            grad_logits[start:end] = part
        return grad_logits, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each position (fp32), differentiable, without materialising an fp32 copy or a
    log-softmax of the whole logits (_TargetLogprobs)."""
    flat = logits.reshape(-1, logits.shape[-1])
    return _TargetLogprobs.apply(flat, targets.reshape(-1).to(flat.device)).view(targets.shape)
