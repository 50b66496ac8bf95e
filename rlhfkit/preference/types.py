"""Pairwise comparisons, how they are rendered for a preference model, and the preference model itself
(spec sections 4.1, 4.3 and 4.5).

A preference model (PM) reads "prompt / Completion A / Completion B / Preference" and answers with one
token, " A" or " B". Its verdict is a float: -1 = A preferred, +1 = B preferred, 0 = tie or anything else.
"""

from __future__ import annotations

import asyncio
import logging
import math
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from rlhfkit.engine.settings import EngineSettings
from rlhfkit.engine.types import ModelInput, NextTokenScores
from rlhfkit.renderers import Message, Renderer, TrainOnWhat, get_renderer, get_text_content
from rlhfkit.tokenizer_utils import get_tokenizer
from rlhfkit.engine.clients import SamplingClient

logger = logging.getLogger(__name__)

Label = Literal["A", "B", "Tie"]
RewardMode = Literal["verdict", "probability", "symmetric"]
REWARD_MODES: tuple[str, ...] = ("verdict", "probability", "symmetric")
VERDICT_OF_LABEL = {"A": -1.0, "B": 1.0, "Tie": 0.0}


@dataclass(frozen=True)
class Comparison:
    prompt_conversation: list[Message]
    completion_A: list[Message]
    completion_B: list[Message]

    def swap(self) -> Comparison:
        return Comparison(self.prompt_conversation, self.completion_B, self.completion_A)


@dataclass(frozen=True)
class LabeledComparison:
    comparison: Comparison
    label: Label

    def __post_init__(self) -> None:
        if self.label not in VERDICT_OF_LABEL:
            raise ValueError(f"label must be 'A', 'B' or 'Tie', got {self.label!r}")

    def swap(self) -> LabeledComparison:
        swapped_label = {"A": "B", "B": "A", "Tie": "Tie"}[self.label]
        return LabeledComparison(self.comparison.swap(), swapped_label)


class ComparisonRenderer(ABC):
    @abstractmethod
    def build_generation_prompt(self, comparison: Comparison) -> ModelInput: ...

    @abstractmethod
    def to_model_input_weights(self, labeled_comparison: LabeledComparison) -> tuple[ModelInput, np.ndarray]: ...

    @property
    @abstractmethod
    def tokenizer(self) -> Any: ...


class ComparisonRendererFromChatRenderer(ComparisonRenderer):
    """Renders a comparison as one chat conversation with system markers between the parts (spec 4.3)."""

    def __init__(self, convo_renderer: Renderer):
        self.convo_renderer = convo_renderer

    @staticmethod
    def comparison_to_conversation(comparison: Comparison) -> list[Message]:
        return [
            *comparison.prompt_conversation,
            {"role": "system", "content": "==== Completion A ===="},
            *comparison.completion_A,
            {"role": "system", "content": "==== Completion B ===="},
            *comparison.completion_B,
            {"role": "system", "content": "==== Preference ===="},
        ]

    def build_generation_prompt(self, comparison: Comparison) -> ModelInput:
        return self.convo_renderer.build_generation_prompt(self.comparison_to_conversation(comparison))

    def to_model_input_weights(self, labeled_comparison: LabeledComparison) -> tuple[ModelInput, np.ndarray]:
        """The conversation plus the label as an assistant reply, cut right after the first trained token,
        so the only trained token is the first token of the label."""
        conversation = self.comparison_to_conversation(labeled_comparison.comparison)
        for message in conversation:
            get_text_content(message)  # text-only content; raises otherwise
        conversation.append({"role": "assistant", "content": labeled_comparison.label})
        model_input, weights = self.convo_renderer.build_supervised_example(
            conversation, TrainOnWhat.LAST_ASSISTANT_MESSAGE
        )
        trained = np.flatnonzero(np.asarray(weights) == 1)
        if len(trained) == 0:
            raise ValueError("the rendered comparison has no trained token")
        end = int(trained[0]) + 1
        return ModelInput.from_ints(model_input.to_ints()[:end]), np.asarray(weights)[:end].copy()

    @property
    def tokenizer(self) -> Any:
        return self.convo_renderer.tokenizer

    def label_token(self, label: Label) -> int:
        """The single token the PM is trained to emit for `label` (found by rendering a dummy comparison)."""
        dummy = Comparison(
            [{"role": "user", "content": "Q"}],
            [{"role": "assistant", "content": "a"}],
            [{"role": "assistant", "content": "b"}],
        )
        model_input, _ = self.to_model_input_weights(LabeledComparison(dummy, label))
        return model_input.to_ints()[-1]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Judgement:
    """One PM call: the greedy verdict (-1/0/+1), the decoded greedy token, and P(B) among {A, B}."""

    verdict: float
    greedy_text: str
    p_b: float

    @property
    def probability_reward(self) -> float:
        return 2.0 * self.p_b - 1.0


class PreferenceModel(ABC):
    """-1 = A preferred, +1 = B preferred, 0 = tie/other.

    The judging contract: every method is a coroutine that only awaits, never blocks the event loop, so the
    judgements of concurrent callers (all groups of an RL iteration, both orders of a win-rate evaluation) are
    issued together; a model on a sampling client sends one `score_next_token_async` per comparison and the
    client's RequestBatcher serves all of them in one batched scoring call."""

    @abstractmethod
    async def __call__(self, comparison: Comparison) -> float: ...

    async def judge_batch(self, comparisons: Sequence[Comparison]) -> list[float]:
        """The reward of each comparison, all judged concurrently."""
        return list(await asyncio.gather(*(self(c) for c in comparisons)))

    async def judge_both_orders(
        self, comparisons: Sequence[Comparison]
    ) -> tuple[list[float], list[float], np.ndarray | None]:
        """Each comparison judged as given and with A and B swapped, concurrently: (rewards as given, rewards
        swapped, P(the original B wins) combining both orders, or None for a model without probabilities)."""
        n = len(comparisons)
        rewards = await self.judge_batch([*comparisons, *(c.swap() for c in comparisons)])
        return rewards[:n], rewards[n:], None


class PreferenceModelBuilder(ABC):
    @abstractmethod
    def __call__(self) -> PreferenceModel: ...


def symmetric_p_b(judged: Judgement, judged_swapped: Judgement) -> float:
    """P(the original B wins) from a comparison judged in both orders: the mean of P(B) as given and of
    P(A) with the two completions swapped. A judge that only looks at position scores 0.5 here."""
    return (judged.p_b + 1.0 - judged_swapped.p_b) / 2.0


class PreferenceModelFromChatRenderer(PreferenceModel):
    """A PM on a sampling client. reward_mode:
    - "verdict": the reference's greedy one-token verdict (-1, 0, +1) in the order given;
    - "probability": 2*P(B | {A, B}) - 1 from the logprobs of the two label tokens, in the order given;
    - "symmetric": each comparison is also judged with A and B swapped and the two probabilities are combined
      (`symmetric_p_b`), reward 2*p - 1. It costs two judgements per call and cancels the judge's position
      bias. In an ALL_PAIRS_BOTH_WAYS tournament the reference already plays every pair in both orders with
      greedy verdicts (and sums them); "symmetric" makes every single matchup order-free, so it pairs
      naturally with ALL_PAIRS_ONE_WAY at the same cost."""

    def __init__(self, convo_renderer: Renderer, sampling_client: SamplingClient, reward_mode: RewardMode = "verdict"):
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {', '.join(REWARD_MODES)}, got {reward_mode!r}")
        self.comparison_renderer = ComparisonRendererFromChatRenderer(convo_renderer)
        self.sampling_client = sampling_client
        self.reward_mode = reward_mode
        self.other_answers: Counter[str] = Counter()  # greedy answers that were not A, B or Tie
        self.label_tokens = [self.comparison_renderer.label_token("A"), self.comparison_renderer.label_token("B")]
        if self.label_tokens[0] == self.label_tokens[1]:
            raise ValueError("labels 'A' and 'B' render to the same first token; the PM cannot tell them apart")

    def _judgement(self, scores: NextTokenScores) -> Judgement:
        text = self.comparison_renderer.tokenizer.decode([scores.argmax_token]).strip()
        if text in VERDICT_OF_LABEL:
            verdict = VERDICT_OF_LABEL[text]
        else:
            if text not in self.other_answers:
                logger.warning(
                    "preference model answered %r (not A, B or Tie); scoring it as 0 (later "
                    "occurrences are counted in .other_answers, not logged)",
                    text,
                )
            self.other_answers[text] += 1
            verdict = 0.0
        logprob_a, logprob_b = scores.candidate_logprobs
        p_b = _sigmoid(logprob_b - logprob_a)  # softmax over {A, B}
        return Judgement(verdict, text, p_b)

    def reward(self, judgement: Judgement, swapped: Judgement | None = None) -> float:
        """The reward of a comparison from its judgement (and, for "symmetric", the swapped comparison's)."""
        if self.reward_mode == "symmetric":
            if swapped is None:
                raise ValueError('reward_mode "symmetric" needs the judgement of the swapped comparison too')
            return 2.0 * symmetric_p_b(judgement, swapped) - 1.0
        return judgement.verdict if self.reward_mode == "verdict" else judgement.probability_reward

    async def _rewards(self, comparisons: Sequence[Comparison]) -> list[float]:
        if self.reward_mode != "symmetric":
            return [self.reward(j) for j in await self.judge_many(comparisons)]
        judged = await self.judge_many([*comparisons, *(c.swap() for c in comparisons)])
        n = len(comparisons)
        return [self.reward(a, b) for a, b in zip(judged[:n], judged[n:])]

    async def judge(self, comparison: Comparison) -> Judgement:
        prompt = self.comparison_renderer.build_generation_prompt(comparison)
        scores = await self.sampling_client.score_next_token_async(prompt, self.label_tokens)
        return self._judgement(scores)

    async def judge_many(self, comparisons: Sequence[Comparison]) -> list[Judgement]:
        """Judge all comparisons: one `score_next_token_async` each, issued together, so the sampling client's
        RequestBatcher serves them (with any other judgements issued in the same loop turns, e.g. the other
        groups of an RL iteration) in one batched scoring call."""
        return list(await asyncio.gather(*(self.judge(c) for c in comparisons)))

    async def __call__(self, comparison: Comparison) -> float:
        if self.reward_mode == "symmetric":
            return self.reward(*await asyncio.gather(self.judge(comparison), self.judge(comparison.swap())))
        return self.reward(await self.judge(comparison))

    async def judge_batch(self, comparisons: Sequence[Comparison]) -> list[float]:
        return await self._rewards(comparisons)

    async def probability_b(self, comparisons: Sequence[Comparison]) -> list[float]:
        return [j.p_b for j in await self.judge_many(comparisons)]

    async def judge_both_orders(
        self, comparisons: Sequence[Comparison]
    ) -> tuple[list[float], list[float], np.ndarray | None]:
        """Both orders from one set of judgements (each comparison and its swap judged once): the rewards as
        given and swapped ("symmetric" combines the pair either way) and the order-symmetric P(B wins)."""
        n = len(comparisons)
        judged = await self.judge_many([*comparisons, *(c.swap() for c in comparisons)])
        given, swapped = judged[:n], judged[n:]
        return (
            [self.reward(g, s) for g, s in zip(given, swapped)],
            [self.reward(s, g) for g, s in zip(given, swapped)],
            np.asarray([symmetric_p_b(g, s) for g, s in zip(given, swapped)]),
        )


@dataclass(frozen=True)
class PreferenceModelBuilderFromChatRenderer(PreferenceModelBuilder):
    """Builds the renderer from the base model's tokenizer and a sampling client on the PM's sampler weights."""

    renderer_name: str
    model_name: str
    rm_weights_path: str
    base_url: str | None = None
    reward_mode: RewardMode = "verdict"
    engine: EngineSettings | None = None  # where the judge runs (None: the RL loop's engine, else the environment)

    def __post_init__(self) -> None:
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {', '.join(REWARD_MODES)}, got {self.reward_mode!r}")

    def __call__(self) -> PreferenceModelFromChatRenderer:
        from rlhfkit.engine import ServiceClient

        renderer = get_renderer(self.renderer_name, get_tokenizer(self.model_name))
        sampling_client = ServiceClient(base_url=self.base_url, settings=self.engine).create_sampling_client(
            model_path=self.rm_weights_path, base_model=self.model_name
        )
        return PreferenceModelFromChatRenderer(renderer, sampling_client, self.reward_mode)
