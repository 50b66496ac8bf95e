"""The sampling client's public API, said once over a backend's batch primitives (the local torch sampler,
the vLLM worker, the Ray inference pool)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

from rlhfkit.engine.futures import APIFuture, RequestBatcher, RequestQueue
from rlhfkit.engine.types import ModelInput, NextTokenScores, SampleResponse, SamplingParams


class SamplingAPI(ABC):
    """A sampling client: samples from (and scores with) a frozen model, whatever backend computes it.

    A backend implements three batch primitives (protected hooks, blocking):
    - `_sample_many(requests)`: a list of (prompt, num_samples, SamplingParams) requests -> one SampleResponse
      per request (params are never None here);
    - `_score_many(prompts, candidates)`: for each prompt, its greedy next token and the logprobs of the shared
      `candidates` as next token -> one NextTokenScores per prompt;
    - `_logprobs_many(prompts)`: the prompt logprobs of each prompt (log p(token_t | tokens_<t), None for the
      first token).
    It sets `self.tokenizer` and calls `super().__init__(thread_name)`.

    Thread: the primitives run only on the client's RequestQueue, so every computation of a client runs on its
    one thread, one call at a time, in submission order (a backend needs no locking of its own per client).

    What the public methods return:
    - `sample`, `compute_logprobs`, `score_next_token`: an APIFuture of one request's result, pending until
      the queue has run it;
    - `sample_async`, `compute_logprobs_async`, `score_next_token_async`: coroutines resolving to the result;
      calls made concurrently on the event loop are gathered by a RequestBatcher into one primitive call (score
      requests make one pass when they share their candidates, else one pass each);
    - `sample_batch`, `compute_logprobs_batch`, `score_next_token_batch`: the result of a whole batch, blocking
      the caller until the queue has run it in one primitive call.
    """

    tokenizer: Any

    def __init__(self, thread_name: str, shared: bool = False):
        self._queue = RequestQueue(thread_name, shared)  # shared: on the process's compute thread (futures.py)
        self._sample_batcher = RequestBatcher(self._sample_many, self._queue)
        self._logprob_batcher = RequestBatcher(self._logprobs_many, self._queue)
        self._score_batcher = RequestBatcher(self._score_requests, self._queue)

    # The backend's batch primitives
    @abstractmethod
    def _sample_many(self, requests: list[tuple[ModelInput, int, SamplingParams]]) -> list[SampleResponse]:
        """One SampleResponse per (prompt, num_samples, params) request."""

    @abstractmethod
    def _score_many(self, prompts: list[ModelInput], candidates: list[int]) -> list[NextTokenScores]:
        """Per prompt: the greedy next token and the next-token logprobs of `candidates`."""

    @abstractmethod
    def _logprobs_many(self, prompts: list[ModelInput]) -> list[list[float | None]]:
        """Per prompt: the logprob of each token given the ones before it (None for the first)."""

    def _score_requests(self, requests: list[tuple[ModelInput, list[int]]]) -> list[NextTokenScores]:
        """Batched (prompt, candidates) requests: one pass when they share their candidates."""
        if len({tuple(c) for _, c in requests}) == 1:
            return self._score_many([p for p, _ in requests], requests[0][1])
        return [self._score_many([p], c)[0] for p, c in requests]

    def get_tokenizer(self):
        return self.tokenizer

    # Generation
    def sample(
        self, prompt: ModelInput, num_samples: int = 1, sampling_params: SamplingParams | None = None
    ) -> APIFuture[SampleResponse]:
        request = (prompt, num_samples, SamplingParams() if sampling_params is None else sampling_params)
        return self._queue.submit(lambda: self._sample_many([request])[0])

    async def sample_async(
        self, prompt: ModelInput, num_samples: int = 1, sampling_params: SamplingParams | None = None
    ) -> SampleResponse:
        return await self._sample_batcher.submit(
            (prompt, num_samples, SamplingParams() if sampling_params is None else sampling_params)
        )

    def sample_batch(self, requests: Sequence[tuple[ModelInput, int, SamplingParams]]) -> list[SampleResponse]:
        """Serve (prompt, num_samples, params) requests together (blocking)."""
        return self._queue.submit(self._sample_many, list(requests)).result()

    # Prompt logprobs
    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """log p(token_t | tokens_<t) for every token of the prompt (None for the first)."""
        return self._queue.submit(lambda: self._logprobs_many([prompt])[0])

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        return await self._logprob_batcher.submit(prompt)

    def compute_logprobs_batch(self, prompts: Sequence[ModelInput]) -> list[list[float | None]]:
        """compute_logprobs of every prompt, in batched passes (blocking)."""
        return self._queue.submit(self._logprobs_many, list(prompts)).result()

    # Next-token scoring
    def score_next_token(self, prompt: ModelInput, candidate_tokens: Sequence[int]) -> APIFuture[NextTokenScores]:
        return self._queue.submit(lambda: self._score_many([prompt], list(candidate_tokens))[0])

    async def score_next_token_async(self, prompt: ModelInput, candidate_tokens: Sequence[int]) -> NextTokenScores:
        return await self._score_batcher.submit((prompt, list(candidate_tokens)))

    def score_next_token_batch(
        self, prompts: Sequence[ModelInput], candidate_tokens: Sequence[int]
    ) -> list[NextTokenScores]:
        """For each prompt: the greedy next token and the logprobs of `candidate_tokens`, in batched passes
        (blocking)."""
        return self._queue.submit(self._score_many, list(prompts), list(candidate_tokens)).result()
