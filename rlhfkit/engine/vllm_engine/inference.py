"""The inference-engine interface on vLLM: `VLLMInferenceWorker`, run as a Ray actor (one per device) or in
process, serving the base model and every LoRA adapter of a run by name (vllm_engine/core.py does the vLLM calls).

The interface (the same as the torch inference worker's):
    load_adapter(adapter_id, path)            a sampler/state checkpoint folder; idempotent; fresh id per version
    sample(adapter_id, requests)              [(prompt ids, num_samples, SamplingParams)] -> [SampleResponse]
    score_next_token(adapter_id, prompts, candidates) -> [NextTokenScores]   (exact full-vocabulary logprobs)
    compute_logprobs(adapter_id, prompts)     [[None, logprob of token 1, ...]] (vLLM's prompt logprobs)
    health() -> dict
`adapter_id=None` is the base model. Sampling semantics are the torch sampler's (requests.make_rows: stop=None
stops at EOS only, stop=[] never early, seeds params.seed + k, max_tokens capped by the context).

vLLM pins a transformers older than rlhfkit's, so the actor runs in the vLLM environment's Python (launch.py
starts it there); like everything in vllm_engine/ it imports only what that environment has (tests/test_layers.py). A restarted actor (max_restarts) rebuilds
its adapters from the registry file in its work_dir, so retried requests find them again.
"""

from __future__ import annotations

from typing import Sequence

from rlhfkit.engine.requests import find_eos_ids, make_rows
from rlhfkit.engine.types import ModelInput, NextTokenScores, SampledSequence, SampleResponse, SamplingParams
from rlhfkit.engine.vllm_engine.core import LORA_RANKS, UnsupportedAdapterError, VLLMCore

__all__ = ["VLLMInferenceWorker", "sample_rows", "responses_from", "sampling_limits"]

MAX_MODEL_LEN = 8192  # the engine's context at most (the KV cache is sized for it)


def sampling_limits(model_dir: str) -> tuple[set[int], int]:
    """(EOS ids, context length) of a model folder, as the local sampler finds them."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    try:
        generation_eos = getattr(GenerationConfig.from_pretrained(model_dir), "eos_token_id", None)
    except OSError:
        generation_eos = None
    eos_ids = find_eos_ids(AutoTokenizer.from_pretrained(model_dir), generation_eos)
    return eos_ids, min(int(getattr(config, "max_position_embeddings", 4096) or 4096), MAX_MODEL_LEN)


def sample_rows(
    requests: Sequence[tuple[list[int], int, SamplingParams | None]], eos_ids: set[int], context: int
) -> tuple[list[int], list[dict]]:
    """The sequences to generate for `requests` as plain rows for VLLMCore.sample, and the number of rows of
    each request (requests.make_rows decides stops, lengths and seeds, as for the torch sampler)."""
    counts, payload = [], []
    for prompt, n, params in requests:
        rows = make_rows(ModelInput.from_ints(prompt), n, params or SamplingParams(), eos_ids, context)
        counts.append(len(rows))
        payload += [
            {
                "prompt": r.prompt,
                "max_tokens": r.max_tokens,
                "temperature": r.temperature,
                "top_p": r.top_p,
                "top_k": r.top_k if r.top_k > 0 else 0,
                "seed": r.seed,
                "stop_strings": r.stop_strings,
                "stop_ids": sorted(r.stop_ids),
            }
            for r in rows
        ]
    return counts, payload


def responses_from(counts: list[int], results: list[dict]) -> list[SampleResponse]:
    out, k = [], 0
    for count in counts:
        out.append(
            SampleResponse(
                [SampledSequence(r["tokens"], r["logprobs"], r["stop_reason"]) for r in results[k : k + count]]
            )
        )
        k += count
    return out


class VLLMInferenceWorker:
    """One vLLM engine with native LoRA behind the inference-engine interface (see the module docstring).
    `work_dir` must stay the same across restarts of one actor (its adapter registry lives there)."""

    def __init__(
        self,
        model_dir: str,
        work_dir: str,
        dtype: str = "bfloat16",
        seed: int = 0,
        max_loras: int = 4,
        max_lora_rank: int = 64,
        max_cpu_loras: int | None = None,
        kv_cache_gb: int = 2,
        enforce_eager: bool = True,
        cpu_ops: str = "rlhfkit",
    ):
        self.eos_ids, self.context = sampling_limits(model_dir)
        self.core = VLLMCore(
            model_dir,
            work_dir,
            dtype=dtype,
            max_model_len=self.context,
            seed=seed,
            enforce_eager=enforce_eager,
            kv_cache_gb=kv_cache_gb,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
            cpu_ops=cpu_ops,
        )

    def load_adapter(self, adapter_id: str, path: str) -> None:
        self.core.load_adapter(adapter_id, path)

    def check_lora_targets(self, modules: list[str], rank: int | None = None) -> None:
        """Raise UnsupportedAdapterError (naming the setting to change) when the engine cannot adapt one of
        `modules` (leaf names such as lm_head, q_proj, or full module paths) or an adapter of LoRA rank `rank`:
        call it before training starts."""
        self.core.check_targets(set(modules), "LoRA target modules")
        if rank is not None and rank > self.core.max_lora_rank:
            allowed = [r for r in LORA_RANKS if r >= rank]
            raise UnsupportedAdapterError(
                f"LoRA rank {rank} is above the vLLM engine's max_lora_rank {self.core.max_lora_rank}: set "
                f"vllm_max_lora_rank={allowed[0] if allowed else max(LORA_RANKS)} or a lower lora_rank"
            )

    def sample(
        self, adapter_id: str | None, requests: list[tuple[list[int], int, SamplingParams]]
    ) -> list[SampleResponse]:
        counts, rows = sample_rows(requests, self.eos_ids, self.context)
        return responses_from(counts, self.core.sample(adapter_id, rows))

    def score_next_token(
        self, adapter_id: str | None, prompts: list[list[int]], candidates: list[int]
    ) -> list[NextTokenScores]:
        return [
            NextTokenScores(argmax, logprobs)
            for argmax, logprobs in self.core.score_next_token(adapter_id, prompts, list(candidates))
        ]

    def compute_logprobs(self, adapter_id: str | None, prompts: list[list[int]]) -> list[list[float | None]]:
        return self.core.compute_logprobs(adapter_id, prompts)

    def health(self) -> dict:
        """The engine's facts (VLLMCore.health)."""
        return {**self.core.health(), "engine": "vllm"}
