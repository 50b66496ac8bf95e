"""Win rate of a policy against reference replies, as judged by the preference model (spec 6)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

import numpy as np

from rlhfkit.completers import TinkerMessageCompleter
from rlhfkit.evaluators import SamplingClientEvaluator
from rlhfkit.preference.types import Comparison, PreferenceModelBuilder
from rlhfkit.renderers import Message, get_renderer
from rlhfkit.tokenizer_utils import get_tokenizer


def win_rate_scores(verdicts_policy_as_b: Sequence[float], verdicts_policy_as_a: Sequence[float]) -> np.ndarray:
    """Score per prompt from the two orders: (r0 - r1 + 2) / 4, where r0 = PM(reference A, policy B) and
    r1 = PM(policy A, reference B). 1 = policy preferred both ways, 0 = reference both ways, 0.5 = a
    position-biased or undecided judge."""
    r0 = np.asarray(verdicts_policy_as_b, dtype=np.float64)
    r1 = np.asarray(verdicts_policy_as_a, dtype=np.float64)
    return (r0 - r1 + 2.0) / 4.0


class ComparisonEvaluator(SamplingClientEvaluator):
    """Samples the policy's reply to each comparison's prompt and judges it against `completion_A` (the
    reference, e.g. the human-chosen HHH reply) in both orders. `both_ways` is accepted for compatibility;
    both orders are always judged (as in the reference)."""

    def __init__(self, preference_model_builder: PreferenceModelBuilder, comparisons: Sequence[Comparison],
                 renderer_name: str, model_name_for_tokenizer: str, both_ways: bool = True, max_tokens: int = 1024,
                 content_preprocessor: Callable[[str], str] | None = None):
        if not comparisons:
            raise ValueError("ComparisonEvaluator needs at least one comparison")
        self.preference_model_builder = preference_model_builder
        self.comparisons = list(comparisons)
        self.renderer = get_renderer(renderer_name, get_tokenizer(model_name_for_tokenizer))
        self.both_ways = both_ways
        self.max_tokens = max_tokens
        self.content_preprocessor = content_preprocessor

    async def __call__(self, sampling_client: Any) -> dict[str, float]:
        preference_model = self.preference_model_builder()  # fresh PM (and PM sampling client) per evaluation
        policy = TinkerMessageCompleter(sampling_client, self.renderer, self.max_tokens, temperature=1.0)
        # All prompts at once: the engine batches the concurrent sampling calls.
        replies = await asyncio.gather(*(policy(c.prompt_conversation) for c in self.comparisons))
        if self.content_preprocessor is not None:
            replies = [{**r, "content": self.content_preprocessor(r["content"])} for r in replies]
        scores = await score_against_reference(preference_model, self.comparisons, replies)
        win_rate, stderr = mean_and_stderr(scores)
        return {"test/win_rate": win_rate, "test/stderr": stderr, "win_rate": win_rate, "stderr": stderr}


async def score_against_reference(preference_model: Any, comparisons: Sequence[Comparison],
                                  replies: Sequence[Message]) -> np.ndarray:
    """Win-rate score per prompt (win_rate_scores) of each reply against its comparison's completion_A, judged
    in both orders in one batched pass."""
    policy_as_b = [Comparison(c.prompt_conversation, c.completion_A, [r]) for c, r in zip(comparisons, replies)]
    policy_as_a = [c.swap() for c in policy_as_b]
    verdicts = await preference_model.judge_batch(policy_as_b + policy_as_a)
    n = len(comparisons)
    return win_rate_scores(verdicts[:n], verdicts[n:])


def mean_and_stderr(scores: np.ndarray) -> tuple[float, float]:
    """The mean score and its standard error (ddof=1; 0 for a single score)."""
    n = len(scores)
    return float(scores.mean()), float(scores.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
