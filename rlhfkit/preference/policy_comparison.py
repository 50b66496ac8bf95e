"""Policies side by side on the same held-out prompts (e.g. SFT, DPO and RLHF): each one's win rate against
the human-chosen replies as judged by one preference model (spec 6's score, both orders, stderr ddof=1), its
mean reply length, and its KL from a reference policy (the SFT policy)."""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import numpy as np

from rlhfkit.completers import TinkerTokenCompleter
from rlhfkit.preference.comparison_policy_evaluator import judge_against_reference, mean_and_stderr
from rlhfkit.preference.types import Comparison, PreferenceModel
from rlhfkit.renderers import Renderer, get_text_content
from rlhfkit.engine.clients import SamplingClient


async def sample_replies(
    sampling_client: SamplingClient, renderer: Renderer, comparisons: Sequence[Comparison], max_tokens: int, seed: int
) -> list[tuple[Any, list[int], list[float]]]:
    """(prompt tokens, reply tokens, their logprobs) per prompt, sampled at temperature 1 (seeded per prompt)."""
    completer = TinkerTokenCompleter(sampling_client, max_tokens, temperature=1.0, seed=seed)
    prompts = [renderer.build_generation_prompt(c.prompt_conversation) for c in comparisons]
    sampled = await asyncio.gather(*(completer(p, renderer.get_stop_sequences()) for p in prompts))
    return [(p, list(s.tokens), list(s.logprobs)) for p, s in zip(prompts, sampled)]


async def kl_from_reference(samples: Sequence[tuple[Any, list[int], list[float]]], reference: Any) -> float:
    """Monte-Carlo KL(policy ‖ reference) in nats per reply: the mean over replies of
    Σ_t (log p_policy − log p_reference) of the sampled reply tokens (sampled from the policy at temperature 1)."""

    async def one(prompt: Any, tokens: list[int], logprobs: list[float]) -> float:
        if not tokens:
            return 0.0
        full = prompt
        for token in tokens:
            full = full.append_int(token)
        reference_logprobs = (await reference.compute_logprobs_async(full))[-len(tokens) :]
        return float(np.sum(np.asarray(logprobs) - np.asarray(reference_logprobs, dtype=np.float64)))

    per_reply = await asyncio.gather(*(one(*sample) for sample in samples))
    return float(np.mean(per_reply))


async def compare_policies(
    policies: dict[str, Any],
    reference_policy: str,
    preference_model: PreferenceModel,
    comparisons: Sequence[Comparison],
    renderer: Renderer,
    max_tokens: int,
    seed: int,
    replies_to_keep: int = 3,
) -> dict[str, Any]:
    """{"policies": {name: {win_rate, stderr, mean_reply_tokens, kl_from_<reference_policy>}}, "n_prompts",
    "replies": the first `replies_to_keep` prompts with the human-chosen reply and each policy's reply}.
    `policies` maps a name to a sampling client; every policy answers the same prompts with the same seeds."""
    if reference_policy not in policies:
        raise ValueError(f"reference_policy {reference_policy!r} is not one of {sorted(policies)}")
    if not comparisons:
        raise ValueError("compare_policies needs at least one held-out comparison")
    results: dict[str, dict[str, float]] = {}
    replies: dict[str, list[str]] = {}
    for name, sampling_client in policies.items():
        samples = await sample_replies(sampling_client, renderer, comparisons, max_tokens, seed)
        messages = [
            {"role": "assistant", "content": get_text_content(renderer.parse_response(tokens)[0])}
            for _, tokens, _ in samples
        ]
        win_rate, stderr = mean_and_stderr(
            (await judge_against_reference(preference_model, comparisons, messages)).scores
        )
        results[name] = {
            "win_rate": win_rate,
            "stderr": stderr,
            "mean_reply_tokens": float(np.mean([len(tokens) for _, tokens, _ in samples])),
            f"kl_from_{reference_policy}": await kl_from_reference(samples, policies[reference_policy]),
        }
        replies[name] = [m["content"] for m in messages]
    kept = [
        {
            "prompt": c.prompt_conversation,
            "human_chosen": get_text_content(c.completion_A[-1]),
            **{name: replies[name][i] for name in policies},
        }
        for i, c in enumerate(comparisons[:replies_to_keep])
    ]
    return {
        "n_prompts": len(comparisons),
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "policies": results,
        "replies": kept,
    }
