"""Win rate of a policy against reference replies, as judged by the preference model (spec 6)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from rlhfkit.compat import warn_ignored
from rlhfkit.completers import TinkerMessageCompleter
from rlhfkit.evaluators import SamplingClientEvaluator
from rlhfkit.preference.preference_datasets import ComparisonDatasetBuilder
from rlhfkit.preference.types import (
    Comparison,
    PreferenceModel,
    PreferenceModelBuilder,
)
from rlhfkit.renderers import Message, get_renderer
from rlhfkit.tokenizer_utils import get_tokenizer
from rlhfkit.engine.clients import SamplingClient


def win_rate_scores(verdicts_policy_as_b: Sequence[float], verdicts_policy_as_a: Sequence[float]) -> np.ndarray:
    """Score per prompt from the two orders: (r0 - r1 + 2) / 4, where r0 = PM(reference A, policy B) and
    r1 = PM(policy A, reference B). 1 = policy preferred both ways, 0 = reference both ways, 0.5 = a
    position-biased or undecided judge."""
    r0 = np.asarray(verdicts_policy_as_b, dtype=np.float64)
    r1 = np.asarray(verdicts_policy_as_a, dtype=np.float64)
    return (r0 - r1 + 2.0) / 4.0


@dataclass
class WinRateMatchups:
    """One win-rate evaluation in full: per prompt, the policy's reply, the two orders' verdicts and the score."""

    comparisons: list[Comparison]  # prompt and the opponent's reply (completion_A)
    replies: list[dict]  # the policy's reply to each prompt
    verdicts_policy_as_b: list[float]  # PM(opponent A, policy B): +1 = policy preferred
    verdicts_policy_as_a: list[float]  # PM(policy A, opponent B): -1 = policy preferred
    scores: np.ndarray  # win_rate_scores of the two orders
    symmetric: np.ndarray | None = None  # P(policy wins), both orders' probabilities combined (chat PMs)

    def metrics(self) -> dict[str, float]:
        win_rate, stderr = mean_and_stderr(self.scores)
        metrics = {"test/win_rate": win_rate, "test/stderr": stderr, "win_rate": win_rate, "stderr": stderr}
        if self.symmetric is not None:
            symmetric, symmetric_stderr = mean_and_stderr(self.symmetric)
            metrics.update({"test/win_rate_symmetric": symmetric, "test/stderr_symmetric": symmetric_stderr})
        return metrics


def mean_and_stderr(scores: np.ndarray) -> tuple[float, float]:
    """The mean score and its standard error (ddof=1; 0 for a single score)."""
    n = len(scores)
    return float(scores.mean()), float(scores.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0


async def judge_against_reference(
    preference_model: PreferenceModel, comparisons: Sequence[Comparison], replies: Sequence[Message]
) -> WinRateMatchups:
    """Each reply judged against its comparison's completion_A in both orders, in one batched pass."""
    policy_as_b = [Comparison(c.prompt_conversation, c.completion_A, [r]) for c, r in zip(comparisons, replies)]
    verdicts_b, verdicts_a, symmetric = await preference_model.judge_both_orders(policy_as_b)
    return WinRateMatchups(
        list(comparisons), list(replies), verdicts_b, verdicts_a, win_rate_scores(verdicts_b, verdicts_a), symmetric
    )


class ComparisonEvaluator(SamplingClientEvaluator):
    """Samples the policy's reply to each comparison's prompt and judges it against `completion_A` (the
    reference, e.g. the human-chosen HHH reply) in both orders. `both_ways` is accepted for compatibility;
    both orders are always judged (as in the reference). `seed` (local addition): prompt k's reply is sampled
    with seed + k, so an evaluation can be reproduced (None: unseeded, as in the reference).

    `test/win_rate` is the reference's score from the PM's rewards (greedy verdicts by default). With a chat PM
    the same judgements also give `test/win_rate_symmetric`: the mean over prompts of P(policy wins) averaged
    over the two orders (`symmetric_p_b`), which a purely position-biased judge scores at exactly 0.5 and which
    moves with the judge's confidence rather than only its argmax."""

    def __init__(
        self,
        preference_model_builder: PreferenceModelBuilder,
        comparisons: Sequence[Comparison],
        renderer_name: str,
        model_name_for_tokenizer: str,
        both_ways: bool = True,
        max_tokens: int = 1024,
        content_preprocessor: Callable[[str], str] | None = None,
        seed: int | None = None,
    ):
        if not comparisons:
            raise ValueError("ComparisonEvaluator needs at least one comparison")
        self.preference_model_builder = preference_model_builder
        self.comparisons = list(comparisons)
        self.renderer = get_renderer(renderer_name, get_tokenizer(model_name_for_tokenizer))
        warn_ignored("ComparisonEvaluator", both_ways=both_ways)
        self.max_tokens = max_tokens
        self.content_preprocessor = content_preprocessor
        self.seed = seed

    async def matchups(self, sampling_client: SamplingClient) -> WinRateMatchups:
        preference_model = self.preference_model_builder()  # fresh PM (and PM sampling client) per evaluation
        policy = TinkerMessageCompleter(
            sampling_client, self.renderer, self.max_tokens, temperature=1.0, seed=self.seed
        )
        # All prompts at once: the engine batches the concurrent sampling calls.
        replies = await asyncio.gather(*(policy(c.prompt_conversation) for c in self.comparisons))
        if self.content_preprocessor is not None:
            replies = [{**r, "content": self.content_preprocessor(r["content"])} for r in replies]
        return await judge_against_reference(preference_model, self.comparisons, replies)

    async def __call__(self, sampling_client: SamplingClient) -> dict[str, float]:
        return (await self.matchups(sampling_client)).metrics()


@dataclass(frozen=True)
class ComparisonEvaluatorBuilder:
    """A ComparisonEvaluator on the held-out comparisons of a comparison builder (e.g. HH-RLHF's win-rate prompts,
    the first `test_size` of them), recorded by its settings rather than by the comparisons themselves."""

    preference_model_builder: PreferenceModelBuilder
    comparison_builder: ComparisonDatasetBuilder
    renderer_name: str
    model_name_for_tokenizer: str
    max_tokens: int = 1024
    seed: int | None = None

    def __call__(self) -> ComparisonEvaluator:
        comparisons = [c.comparison for c in self.comparison_builder.held_out_comparisons()]
        return ComparisonEvaluator(
            self.preference_model_builder,
            comparisons,
            self.renderer_name,
            self.model_name_for_tokenizer,
            max_tokens=self.max_tokens,
            seed=self.seed,
        )
