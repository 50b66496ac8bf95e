"""Padding and microbatching of token sequences (shared by training and scoring)."""

from __future__ import annotations

import os
from typing import Sequence

import torch


def microbatch_token_budget() -> int:
    """Padded tokens per forward pass (bounds activation memory). Override with RLHFKIT_MICROBATCH_TOKENS."""
    return int(os.environ.get("RLHFKIT_MICROBATCH_TOKENS", "4096"))


def plan_microbatches(lengths: Sequence[int], budget: int | None = None) -> list[list[int]]:
    """Group indices into microbatches of similar length (sorted longest first) whose padded size
    (rows × longest) stays within the token budget. Sorting by length avoids most padding."""
    budget = budget or microbatch_token_budget()
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), left-padded so every sequence ends at the last column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each position, computed in fp32 without materialising a full log-softmax copy."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return -torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)
