"""Completers: a policy as "prompt tokens -> sampled tokens" or "conversation -> next message"."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from rlhfkit.engine.types import ModelInput, SamplingParams, StopReason
from rlhfkit.renderers import Message, Renderer, get_text_content
from rlhfkit.engine.clients import SamplingClient

StopCondition = list[str] | list[int]


@dataclass
class TokensWithLogprobs:
    """Sampled tokens, the sampler's logprob of each, and why sampling stopped ("stop" or "length")."""

    tokens: list[int]
    maybe_logprobs: list[float] | None
    stop_reason: StopReason = "stop"

    @property
    def logprobs(self) -> list[float]:
        if self.maybe_logprobs is None:
            raise ValueError("these tokens were sampled without logprobs")
        return self.maybe_logprobs


class TokenCompleter(ABC):
    @abstractmethod
    async def __call__(self, model_input: ModelInput, stop: StopCondition) -> TokensWithLogprobs: ...


class MessageCompleter(ABC):
    @abstractmethod
    async def __call__(self, messages: list[Message]) -> Message: ...


class TinkerTokenCompleter(TokenCompleter):
    """Samples one continuation. Concurrent calls are batched into one generation batch by the engine.
    With a `seed`, call k uses seed + k, so an episode's samples are reproducible."""

    def __init__(
        self,
        sampling_client: SamplingClient,
        max_tokens: int,
        temperature: float = 1.0,
        context_window: int | None = None,
        seed: int | None = None,
    ):
        self.sampling_client = sampling_client
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.context_window = context_window
        self.seed = seed
        self._num_calls = 0

    async def __call__(self, model_input: ModelInput, stop: StopCondition) -> TokensWithLogprobs:
        max_tokens = self.max_tokens
        if self.context_window is not None:
            max_tokens = min(max_tokens, self.context_window - model_input.length)
            if max_tokens <= 0:
                raise ValueError(
                    f"the prompt ({model_input.length} tokens) fills the context window ({self.context_window} tokens)"
                )
        seed = None if self.seed is None else self.seed + self._num_calls
        self._num_calls += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=self.temperature, stop=stop, seed=seed)
        response = await self.sampling_client.sample_async(prompt=model_input, num_samples=1, sampling_params=params)
        sequence = response.sequences[0]
        return TokensWithLogprobs(list(sequence.tokens), sequence.logprobs, sequence.stop_reason)


class TinkerMessageCompleter(MessageCompleter):
    """Samples the assistant's next message and parses it with the renderer (content kept whatever the
    termination). With a `seed`, call k uses seed + k (concurrent calls are numbered in the order they start)."""

    def __init__(
        self,
        sampling_client: SamplingClient,
        renderer: Renderer,
        max_tokens: int,
        stop_condition: StopCondition | None = None,
        temperature: float = 1.0,
        seed: int | None = None,
    ):
        self.sampling_client = sampling_client
        self.renderer = renderer
        self.max_tokens = max_tokens
        self.stop_condition = stop_condition if stop_condition is not None else renderer.get_stop_sequences()
        self.temperature = temperature
        self.seed = seed
        self._num_calls = 0

    async def __call__(self, messages: list[Message]) -> Message:
        prompt = self.renderer.build_generation_prompt(messages)
        seed = None if self.seed is None else self.seed + self._num_calls
        self._num_calls += 1
        params = SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, stop=self.stop_condition, seed=seed
        )
        response = await self.sampling_client.sample_async(prompt=prompt, num_samples=1, sampling_params=params)
        message, _termination = self.renderer.parse_response(response.sequences[0].tokens)
        return {"role": "assistant", "content": get_text_content(message)}
