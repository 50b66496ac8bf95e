"""Win rate of a policy against reference replies, as judged by the preference model (spec 6)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from rlhfkit.compat import warn_ignored
from rlhfkit.completers import TinkerMessageCompleter
from rlhfkit.evaluators import SamplingClientEvaluator
from rlhfkit.preference.preference_datasets import ComparisonDatasetBuilder
from rlhfkit.preference.types import Comparison, PreferenceModelBuilder
from rlhfkit.renderers import get_renderer
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
        warn_ignored("ComparisonEvaluator", both_ways=both_ways)
        self.max_tokens = max_tokens
        self.content_preprocessor = content_preprocessor

    async def __call__(self, sampling_client: Any) -> dict[str, float]:
        preference_model = self.preference_model_builder()  # fresh PM (and PM sampling client) per evaluation
        policy = TinkerMessageCompleter(sampling_client, self.renderer, self.max_tokens, temperature=1.0)
        # All prompts at once: the engine batches the concurrent sampling calls.
        replies = await asyncio.gather(*(policy(c.prompt_conversation) for c in self.comparisons))
        if self.content_preprocessor is not None:
            replies = [{**r, "content": self.content_preprocessor(r["content"])} for r in replies]
        policy_as_b = [Comparison(c.prompt_conversation, c.completion_A, [r])
                       for c, r in zip(self.comparisons, replies, strict=True)]
        policy_as_a = [c.swap() for c in policy_as_b]
        verdicts = await preference_model.judge_batch(policy_as_b + policy_as_a)  # one batched judge pass
        n = len(self.comparisons)
        scores = win_rate_scores(verdicts[:n], verdicts[n:])
        win_rate = float(scores.mean())
        stderr = float(scores.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        return {"test/win_rate": win_rate, "test/stderr": stderr, "win_rate": win_rate, "stderr": stderr}


@dataclass(frozen=True)
class ComparisonEvaluatorBuilder:
    """A ComparisonEvaluator on the held-out comparisons of a comparison builder (e.g. HH-RLHF's win-rate prompts,
    the first `test_size` of them), recorded by its settings rather than by the comparisons themselves."""

    preference_model_builder: PreferenceModelBuilder
    comparison_builder: ComparisonDatasetBuilder
    renderer_name: str
    model_name_for_tokenizer: str
    max_tokens: int = 1024

    def __call__(self) -> ComparisonEvaluator:
        comparisons = [c.comparison for c in self.comparison_builder.held_out_comparisons()]
        return ComparisonEvaluator(self.preference_model_builder, comparisons, self.renderer_name,
                                   self.model_name_for_tokenizer, max_tokens=self.max_tokens)
