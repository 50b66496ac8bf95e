"""The reference's `shorter` recipe: RL against a rule-based preference model that prefers the shorter reply.

No preference model is trained and no data is read: every RL prompt is the one conversation "Who are you?"
(1,024 rows, as the reference's dummy data set), and a matchup goes to the reply with fewer characters (a tie
when both are equally long). RL starts from the base model. Its metric is env/all/ac_tokens_per_turn, which
falls as the policy learns to answer briefly (spec 10: "drops significantly after 20 steps").

    rlhfkit rl preset=shorter [rl_max_steps_off_policy=1] [rl_stream_minibatches=2] ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhfkit.preference.preference_datasets import ComparisonDatasetBuilder
from rlhfkit.preference.types import Comparison, LabeledComparison, PreferenceModel, PreferenceModelBuilder
from rlhfkit.renderers import Message

CONVO_PREFIX: list[Message] = [{"role": "user", "content": "Who are you?"}]
DUMMY_COMPLETION: list[Message] = [
    {
        "role": "assistant",
        "content": "Hello there! I am a large language model. How can I assist you? Feel free to ask me anything.",
    }
]
NUM_ROWS = 1024


def completion_length(completion: list[Message]) -> int:
    """Characters over the completion's messages."""
    return sum(len(message["content"]) for message in completion)


class PreferenceModelShorter(PreferenceModel):
    """-1 (A preferred) when A is shorter, +1 when B is shorter, 0 on equal length."""

    async def __call__(self, comparison: Comparison) -> float:
        a, b = completion_length(comparison.completion_A), completion_length(comparison.completion_B)
        return 0.0 if a == b else (1.0 if a > b else -1.0)


@dataclass(frozen=True)
class ShorterPreferenceModelBuilder(PreferenceModelBuilder):
    reward_mode: str = "verdict"  # as a chat judge's reward_mode says: its rewards are verdicts (-1, 0, +1)

    def __call__(self) -> PreferenceModelShorter:
        return PreferenceModelShorter()


@dataclass(frozen=True)
class ShorterComparisonBuilder(ComparisonDatasetBuilder):
    """NUM_ROWS copies of the one prompt; no test split. The comparison's completions are unused by RL."""

    swap: bool = False

    def get_train_and_test_datasets(self) -> tuple[list[Any], list[Any] | None]:
        return [{"id": k} for k in range(NUM_ROWS)], None

    def example_to_labeled_comparison(self, example: Any) -> LabeledComparison | None:
        return LabeledComparison(Comparison(CONVO_PREFIX, DUMMY_COMPLETION, DUMMY_COMPLETION), "Tie")
