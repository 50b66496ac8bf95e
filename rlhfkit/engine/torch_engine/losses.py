"""The service's named losses (spec §3.3, §5.6). Each is a SUM over the datum's target positions.

A loss takes the datum's target-token logprobs under the current weights (`logprobs`, with gradient) and
the datum's loss inputs (tensors of the same length) and returns a scalar.
"""

from __future__ import annotations

from typing import Callable

import torch

Inputs = dict[str, torch.Tensor]


def cross_entropy(logprobs: torch.Tensor, inputs: Inputs, config: dict) -> torch.Tensor:
    """−Σ_t w_t · log p(target_t)."""
    return -(inputs["weights"] * logprobs).sum()


def _ratio(logprobs: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    return torch.exp(logprobs - inputs["logprobs"])


def importance_sampling(logprobs: torch.Tensor, inputs: Inputs, config: dict) -> torch.Tensor:
    """−Σ_t ratio_t · A_t with ratio_t = exp(logp_θ − logp_sampler). On-policy its gradient is REINFORCE."""
    return -(_ratio(logprobs, inputs) * inputs["advantages"]).sum()


def ppo(logprobs: torch.Tensor, inputs: Inputs, config: dict) -> torch.Tensor:
    """−Σ_t min(ratio·A, clip(ratio, low, high)·A); thresholds default to 0.8 and 1.2."""
    low = config.get("clip_low_threshold", 0.8)
    high = config.get("clip_high_threshold", 1.2)
    ratio = _ratio(logprobs, inputs)
    advantages = inputs["advantages"]
    return -torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages).sum()


def cispo(logprobs: torch.Tensor, inputs: Inputs, config: dict) -> torch.Tensor:
    """−Σ_t sg(clip(ratio, low, high)) · A_t · logp_θ; thresholds default to 0.0 and 4.0."""
    low = config.get("clip_low_threshold", 0.0)
    high = config.get("clip_high_threshold", 4.0)
    coefficient = _ratio(logprobs, inputs).clamp(low, high).detach()
    return -(coefficient * inputs["advantages"] * logprobs).sum()


LOSSES: dict[str, Callable[[torch.Tensor, Inputs, dict], torch.Tensor]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
}
REQUIRED_INPUTS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss_fn {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name]
