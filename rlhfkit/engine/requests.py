"""What a sampling request asks for, row by row: the shared request code of every inference engine (torch, vLLM).

`make_rows` turns one request (prompt, number of samples, SamplingParams) into the sequences to generate, with
the reference's semantics: stop=None stops at EOS only, stop=[] never stops early, a seeded request gives sample
k the seed params.seed + k, max_tokens is capped by the model's context. No torch: the vLLM side imports it too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.engine.types import ModelInput, SamplingParams


@dataclass
class Row:
    """One sequence to generate."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_strings: list[str]
    stop_ids: set[int]  # the EOS ids are among them unless the caller asked for stop=[]
    seed: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None

    generator: Any = None  # the sampler's random generator for this row, seeded with `seed`


def make_rows(
    prompt: ModelInput, num_samples: int, params: SamplingParams, eos_ids: set[int], context: int
) -> list[Row]:
    """The sequences to generate for one request: stop conditions, max_tokens capped by the context, and one
    seed per sample (params.seed + k, so a seeded request is reproducible)."""
    tokens = prompt.to_ints()
    if not tokens:
        raise ValueError("sample: the prompt is empty")
    stop = [params.stop] if isinstance(params.stop, (str, int)) else params.stop
    stop_strings = [s for s in (stop or []) if isinstance(s, str)]
    stop_ids = {int(s) for s in (stop or []) if not isinstance(s, str)}
    if stop is None or len(stop) > 0:  # stop=None: EOS only; stop=[]: not even EOS
        stop_ids |= eos_ids
    room = context - len(tokens)
    max_tokens = min(params.max_tokens if params.max_tokens is not None else room, room)
    if max_tokens <= 0:
        raise ValueError(
            f"sample: the prompt ({len(tokens)} tokens) leaves no room in the model's context ({context} tokens)"
        )
    base_seed = params.seed if params.seed is not None else random.getrandbits(62)
    return [
        Row(tokens, max_tokens, params.temperature, params.top_k, params.top_p, stop_strings, stop_ids, base_seed + k)
        for k in range(num_samples)
    ]


def find_eos_ids(tokenizer, model_config_eos: Any) -> set[int]:
    """The tokenizer's EOS id and the generation config's (one id or a list)."""
    ids = {tokenizer.eos_token_id}
    ids.update(model_config_eos if isinstance(model_config_eos, list) else [model_config_eos])
    return {int(i) for i in ids if i is not None}
