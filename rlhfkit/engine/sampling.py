"""The local sampling client: batched generation with a KV cache, logprobs, and next-token scoring.

Concurrent `_async` calls (e.g. all rollouts of an RL batch, all matchups judged by a preference model) are
gathered by a small batcher and served by one batched computation, so recipes can issue one request per
sequence and still get large batches.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rlhfkit.engine.batching import pad_left, plan_microbatches, token_logprobs
from rlhfkit.engine.futures import APIFuture
from rlhfkit.engine.lora import LoraSpec, merge_adapter
from rlhfkit.engine.models import Precision, load_base_model, load_tokenizer
from rlhfkit.engine.types import ModelInput, NextTokenScores, SampledSequence, SampleResponse, SamplingParams


def max_sampling_batch() -> int:
    return int(os.environ.get("RLHFKIT_SAMPLING_BATCH", "64"))


class _Batcher:
    """Collects requests submitted concurrently on the running event loop and serves them in one call of
    `run(requests) -> results`. It waits until a full loop turn brings no new request, so nested gathers
    (groups of envs, pairs of orders) all land in the same batch."""

    def __init__(self, run: Callable[[list[Any]], list[Any]]):
        self.run = run
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.flushing = False

    async def submit(self, request: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((request, future))
        if not self.flushing:
            self.flushing = True
            loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        seen = -1
        while seen != len(self.pending):
            seen = len(self.pending)
            for _ in range(3):
                await asyncio.sleep(0)
        batch, self.pending, self.flushing = self.pending, [], False
        try:
            results = self.run([request for request, _ in batch])
        except BaseException as e:  # hand the error to every waiter
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)


@dataclass
class _Row:
    """One sequence to generate."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_strings: list[str]
    stop_ids: set[int]
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


class SamplingClient:
    """Samples from (and scores with) a frozen model: a base model, or a base model with a LoRA adapter
    merged into its weights (merging makes generation and scoring faster than running the adapter)."""

    def __init__(self, base_model: str, model: torch.nn.Module, precision: Precision):
        self.base_model = base_model
        self.model = model.eval()
        self.precision = precision
        self.tokenizer = load_tokenizer(base_model)
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._eos_ids = self._find_eos_ids()
        self._context = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
        self._sample_batcher = _Batcher(self._sample_many)
        self._logprob_batcher = _Batcher(self._compute_logprobs_many)
        self._score_batcher = _Batcher(lambda reqs: self._score_many([r[0] for r in reqs], reqs[0][1])
                                       if len({tuple(r[1]) for r in reqs}) == 1
                                       else [self._score_many([p], c)[0] for p, c in reqs])

    @classmethod
    def from_base(cls, base_model: str, precision: Precision) -> "SamplingClient":
        return cls(base_model, load_base_model(base_model, precision), precision)

    @classmethod
    def from_adapter(cls, spec: LoraSpec, tensors: dict[str, torch.Tensor], precision: Precision) -> "SamplingClient":
        model = load_base_model(spec.base_model, precision)
        merge_adapter(model, tensors, spec.scale)
        return cls(spec.base_model, model, precision)

    def _find_eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return {int(i) for i in ids if i is not None}

    def get_tokenizer(self):
        return self.tokenizer

    # ---------------------------------------------------------------------------------------------
    # Generation

    def _make_rows(self, prompt: ModelInput, num_samples: int, params: SamplingParams) -> list[_Row]:
        tokens = prompt.to_ints()
        if not tokens:
            raise ValueError("sample: the prompt is empty")
        stop = [params.stop] if isinstance(params.stop, (str, int)) else params.stop
        stop_strings = [s for s in (stop or []) if isinstance(s, str)]
        stop_ids = {int(s) for s in (stop or []) if not isinstance(s, str)}
        if stop is None or len(stop) > 0:  # stop=None: EOS only; stop=[]: not even EOS
            stop_ids |= self._eos_ids
        room = self._context - len(tokens)
        max_tokens = min(params.max_tokens if params.max_tokens is not None else room, room)
        if max_tokens <= 0:
            raise ValueError(f"sample: the prompt ({len(tokens)} tokens) leaves no room in the model's context "
                             f"({self._context} tokens)")
        base_seed = params.seed if params.seed is not None else random.getrandbits(62)
        rows = []
        for k in range(num_samples):
            generator = torch.Generator().manual_seed(base_seed + k)
            rows.append(_Row(tokens, max_tokens, params.temperature, params.top_k, params.top_p, stop_strings,
                             stop_ids, generator))
        return rows

    def _sample_many(self, requests: list[tuple[ModelInput, int, SamplingParams]]) -> list[SampleResponse]:
        per_request = [self._make_rows(*request) for request in requests]
        rows = [row for group in per_request for row in group]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt))
        limit = max_sampling_batch()
        for start in range(0, len(order), limit):
            self._generate([rows[i] for i in order[start:start + limit]])
        return [SampleResponse([SampledSequence(r.tokens, r.logprobs, r.stop_reason) for r in group])
                for group in per_request]

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token per row and its logprob under the temperature-scaled distribution (inverse-CDF draws
        from each row's own generator; greedy rows take the argmax)."""
        logits = logits.float()
        temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows], device=logits.device)
        logp = torch.log_softmax(logits / temps[:, None], dim=-1)
        probs = logp.exp()
        if any(r.top_k > 0 or r.top_p < 1.0 for r in rows):
            probs, index = probs.sort(dim=-1, descending=True)
            vocab = probs.shape[-1]
            ks = torch.tensor([r.top_k if r.top_k > 0 else vocab for r in rows], device=probs.device)
            ps = torch.tensor([r.top_p for r in rows], device=probs.device)
            rank = torch.arange(vocab, device=probs.device)[None, :]
            keep = (rank < ks[:, None]) & ((probs.cumsum(-1) - probs) < ps[:, None])
            probs = probs * keep
        else:
            index = None
        cdf = probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(cdf.device) * cdf[:, -1]
        choice = torch.searchsorted(cdf, u[:, None]).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
        tokens = index.gather(-1, choice[:, None]).squeeze(-1) if index is not None else choice
        greedy = torch.tensor([r.temperature <= 0 for r in rows], device=logits.device)
        tokens = torch.where(greedy, logits.argmax(-1), tokens)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)

    def _finished(self, row: _Row) -> bool:
        token = row.tokens[-1]
        if token in row.stop_ids:
            row.stop_reason = "stop"
        elif row.stop_strings:
            longest = max(len(s) for s in row.stop_strings)
            tail = self.tokenizer.decode(row.tokens[-(longest + 2):])
            if any(s in tail for s in row.stop_strings):
                row.stop_reason = "stop"
        if row.stop_reason is None and len(row.tokens) >= row.max_tokens:
            row.stop_reason = "length"
        return row.stop_reason is not None

    @torch.inference_mode()
    def _generate(self, rows: list[_Row]) -> None:
        """Generate all rows together: left-padded prefill, then one token per step with a KV cache; finished
        rows leave the batch (their cache rows are dropped)."""
        from transformers import DynamicCache

        device = self.precision.device
        ids, mask, positions = pad_left([r.prompt for r in rows], self._pad_id, device)
        cache = DynamicCache()
        active = list(range(len(rows)))
        with self.precision.autocast:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        next_position = positions[:, -1] + 1
        while True:
            tokens, logprobs = self._choose(logits, [rows[i] for i in active])
            keep = []
            for slot, i in enumerate(active):
                rows[i].tokens.append(int(tokens[slot]))
                rows[i].logprobs.append(float(logprobs[slot]))
                if not self._finished(rows[i]):
                    keep.append(slot)
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                tokens, mask, next_position = tokens[index], mask[index], next_position[index]
                active = [active[slot] for slot in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            with self.precision.autocast:
                out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None],
                                 past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
            next_position = next_position + 1

    def sample(self, prompt: ModelInput, num_samples: int = 1, sampling_params: SamplingParams | None = None
               ) -> APIFuture[SampleResponse]:
        return APIFuture(self._sample_many([(prompt, num_samples, sampling_params or SamplingParams())])[0])

    async def sample_async(self, prompt: ModelInput, num_samples: int = 1,
                           sampling_params: SamplingParams | None = None) -> SampleResponse:
        return await self._sample_batcher.submit((prompt, num_samples, sampling_params or SamplingParams()))

    # ---------------------------------------------------------------------------------------------
    # Scoring

    def _forward_left_padded(self, sequences: Sequence[list[int]], keep_last_only: bool) -> list[torch.Tensor]:
        """Logits for each sequence, computed in length-sorted microbatches; with keep_last_only just the
        last position's logits (the unembedding runs on one position: much cheaper with a large vocabulary)."""
        results: list[torch.Tensor | None] = [None] * len(sequences)
        for batch in plan_microbatches([len(s) for s in sequences]):
            ids, mask, positions = pad_left([sequences[i] for i in batch], self._pad_id, self.precision.device)
            with torch.inference_mode(), self.precision.autocast:
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                    logits_to_keep=1 if keep_last_only else 0).logits
            for row, i in enumerate(batch):
                results[i] = logits[row, -1] if keep_last_only else logits[row, ids.shape[1] - len(sequences[i]):]
        return results  # type: ignore[return-value]

    def _compute_logprobs_many(self, prompts: list[ModelInput]) -> list[list[float | None]]:
        sequences = [p.to_ints() for p in prompts]
        out = []
        for tokens, logits in zip(sequences, self._forward_left_padded(sequences, keep_last_only=False)):
            target = torch.as_tensor(tokens[1:], device=logits.device)
            out.append([None] + token_logprobs(logits[:-1], target).tolist())
        return out

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """log p(token_t | tokens_<t) for every token of the prompt (None for the first)."""
        return APIFuture(self._compute_logprobs_many([prompt])[0])

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        return await self._logprob_batcher.submit(prompt)

    def _score_many(self, prompts: list[ModelInput], candidates: Sequence[int]) -> list[NextTokenScores]:
        last = self._forward_left_padded([p.to_ints() for p in prompts], keep_last_only=True)
        logits = torch.stack(last).float()
        logp = torch.log_softmax(logits, dim=-1)
        argmax = logits.argmax(-1).tolist()
        chosen = logp[:, list(candidates)].tolist() if len(candidates) else [[] for _ in prompts]
        return [NextTokenScores(a, c) for a, c in zip(argmax, chosen)]

    def score_next_token_batch(self, prompts: Sequence[ModelInput], candidate_tokens: Sequence[int]
                               ) -> list[NextTokenScores]:
        """For each prompt: the greedy next token and the logprobs of `candidate_tokens`, in batched passes."""
        return self._score_many(list(prompts), list(candidate_tokens))

    def score_next_token(self, prompt: ModelInput, candidate_tokens: Sequence[int]) -> APIFuture[NextTokenScores]:
        return APIFuture(self._score_many([prompt], list(candidate_tokens))[0])

    async def score_next_token_async(self, prompt: ModelInput, candidate_tokens: Sequence[int]) -> NextTokenScores:
        return await self._score_batcher.submit((prompt, list(candidate_tokens)))
