"""RL against a pairwise preference model (spec 5.1-5.3).

Each prompt gets a group of `group_size` replies from the policy. The preference model judges pairs of
replies (a tournament); a reply's reward is its wins minus losses over its matchups, averaged, minus 1 if
the reply did not end on the renderer's stop sequence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rlhfkit.completers import StopCondition
from rlhfkit.engine.types import ModelInput
from rlhfkit.preference.types import Comparison, PreferenceModel, PreferenceModelBuilder
from rlhfkit.renderers import Message, Renderer, get_renderer, get_text_content
from rlhfkit.rl.types import (
    Action,
    Env,
    EnvGroupBuilder,
    Logs,
    Metrics,
    Observation,
    RLDataset,
    RLDatasetBuilder,
    StepResult,
    Trajectory,
)
from rlhfkit.tokenizer_utils import get_tokenizer


class TournamentPattern(str, enum.Enum):
    ALL_PAIRS_BOTH_WAYS = "all_pairs_both_ways"  # every ordered pair (i, j), i != j
    ALL_PAIRS_ONE_WAY = "all_pairs_one_way"  # i < j only; the lower index is always A


def get_pairs(n: int, pattern: TournamentPattern) -> list[tuple[int, int]]:
    """Matchups (A index, B index) among n players, i-major: (0,1), (0,2), ..., (1,0), (1,2), ..."""
    pattern = TournamentPattern(pattern)
    if pattern == TournamentPattern.ALL_PAIRS_BOTH_WAYS:
        return [(i, j) for i in range(n) for j in range(n) if i != j]
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def get_pairs_chunked(n: int, pattern: TournamentPattern, chunk_size: int) -> list[tuple[int, int]]:
    """Pairs formed only within consecutive chunks of `chunk_size` players (linear cost for large groups)."""
    if chunk_size < 1:
        raise ValueError(f"matchup_group_size must be >= 1, got {chunk_size}")
    pairs = []
    for start in range(0, n, chunk_size):
        size = min(chunk_size, n - start)
        pairs += [(start + i, start + j) for i, j in get_pairs(size, pattern)]
    return pairs


class PreferenceEnv(Env):
    """One reply to a conversation prefix. The step reward is 0; the real reward comes from the group."""

    def __init__(self, convo_prefix: list[Message], policy_renderer: Renderer):
        self.convo_prefix = convo_prefix
        self.policy_renderer = policy_renderer

    @property
    def stop_condition(self) -> StopCondition:
        return self.policy_renderer.get_stop_sequences()

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        return self.policy_renderer.build_generation_prompt(self.convo_prefix), self.stop_condition

    async def step(self, action: Action, *, extra: dict | None = None) -> StepResult:
        return StepResult(
            reward=0.0, episode_done=True, next_observation=ModelInput.empty(), next_stop_condition=self.stop_condition
        )


class PairwisePreferenceGroupBuilder(EnvGroupBuilder):
    format_coef = 1.0  # penalty for a reply that did not end on the stop sequence

    def __init__(
        self,
        convo_prefix: list[Message],
        policy_renderer: Renderer,
        tournament_pattern: TournamentPattern,
        preference_model: PreferenceModel,
        num_envs: int,
        content_preprocessor: Callable[[str], str] | None = None,
        matchup_group_size: int = 4,
        eval_target_completion_A: list[Message] | None = None,
    ):
        self.convo_prefix = convo_prefix
        self.policy_renderer = policy_renderer
        self.tournament_pattern = TournamentPattern(tournament_pattern)
        self.preference_model = preference_model
        self.num_envs = num_envs
        self.content_preprocessor = content_preprocessor
        self.matchup_group_size = matchup_group_size
        self.eval_target_completion_A = eval_target_completion_A
        self._reward_logs: Logs = {}

    async def make_envs(self) -> Sequence[Env]:
        return [PreferenceEnv(self.convo_prefix, self.policy_renderer) for _ in range(self.num_envs)]

    def _parse(self, trajectory: Trajectory) -> tuple[Message, bool]:
        message, termination = self.policy_renderer.parse_response(trajectory.transitions[-1].ac.tokens)
        content = get_text_content(message)
        if self.content_preprocessor is not None:
            content = self.content_preprocessor(content)
        return {"role": "assistant", "content": content}, termination.is_stop_sequence

    async def compute_group_rewards(
        self, trajectory_group: list[Trajectory], env_group: Sequence[Env]
    ) -> list[tuple[float, Metrics]]:
        parsed = [self._parse(traj) for traj in trajectory_group]
        messages = [m for m, _ in parsed]
        valid = [v for _, v in parsed]
        n = len(trajectory_group)
        if self.eval_target_completion_A is not None:
            # Each reply (as B) against a fixed target (as A): +1 win, -1 loss.
            comparisons = [Comparison(self.convo_prefix, self.eval_target_completion_A, [m]) for m in messages]
            verdicts = await self.preference_model.judge_batch(comparisons)
            matchups: list[tuple[int, int]] = [(-1, k) for k in range(n)]
        else:
            matchups = get_pairs_chunked(n, self.tournament_pattern, self.matchup_group_size)
            comparisons = [Comparison(self.convo_prefix, [messages[i]], [messages[j]]) for i, j in matchups]
            verdicts = await self.preference_model.judge_batch(comparisons)  # one batched judge pass
        score = [0.0] * n
        count = [0] * n
        for (i, j), verdict in zip(matchups, verdicts, strict=True):
            # verdict -1: A (player i) preferred, +1: B (player j) preferred
            score[j] += verdict
            count[j] += 1
            if i >= 0:
                score[i] -= verdict
                count[i] += 1
        win_minus_loss = [s / c if c else 0.0 for s, c in zip(score, count)]
        rewards = [wml + self.format_coef * (float(ok) - 1.0) for wml, ok in zip(win_minus_loss, valid)]
        self._reward_logs = {
            "prompt": self.convo_prefix,
            "replies": [get_text_content(m) for m in messages],
            "valid_format": valid,
            "matchups": [{"A": i, "B": j, "verdict": float(v)} for (i, j), v in zip(matchups, verdicts)],
            "win_minus_loss": win_minus_loss,
        }
        return [(r, {"win_minus_loss": wml, "format": float(ok)}) for r, wml, ok in zip(rewards, win_minus_loss, valid)]

    def reward_logs(self) -> Logs:
        return self._reward_logs

    def logging_tags(self) -> list[str]:
        return ["pair_pref"]


class PairwisePreferenceDataset(RLDataset):
    """Batches of prompts from a comparison dataset's rows; the rows' completions and labels are ignored."""

    def __init__(
        self,
        comparison_builder: Any,
        rows: Any,
        batch_size: int,
        policy_renderer: Renderer,
        preference_model: PreferenceModel,
        group_size: int,
        tournament_pattern: TournamentPattern = TournamentPattern.ALL_PAIRS_BOTH_WAYS,
        content_preprocessor: Callable[[str], str] | None = None,
        matchup_group_size: int = 4,
    ):
        if batch_size < 1 or group_size < 1:
            raise ValueError(f"batch_size and group_size must be >= 1, got {batch_size} and {group_size}")
        self.comparison_builder = comparison_builder
        self.rows = rows
        self.batch_size = batch_size
        self.policy_renderer = policy_renderer
        self.preference_model = preference_model
        self.group_size = group_size
        self.tournament_pattern = tournament_pattern
        self.content_preprocessor = content_preprocessor
        self.matchup_group_size = matchup_group_size

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size

    def get_batch(self, index: int) -> list[PairwisePreferenceGroupBuilder]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (dataset has {len(self)} batches)")
        builders = []
        for row_idx in range(index * self.batch_size, (index + 1) * self.batch_size):
            labeled = self.comparison_builder.example_to_labeled_comparison(self.rows[row_idx])
            if labeled is None:
                continue
            builders.append(
                PairwisePreferenceGroupBuilder(
                    convo_prefix=labeled.comparison.prompt_conversation,
                    policy_renderer=self.policy_renderer,
                    tournament_pattern=self.tournament_pattern,
                    preference_model=self.preference_model,
                    num_envs=self.group_size,
                    content_preprocessor=self.content_preprocessor,
                    matchup_group_size=self.matchup_group_size,
                )
            )
        return builders


@dataclass(frozen=True)
class PairwisePreferenceRLDatasetBuilder(RLDatasetBuilder):
    """Builds the RL prompt dataset and the (single, shared) preference model. There is no RL test set:
    the win rate is measured by ComparisonEvaluator."""

    comparison_builder: Any
    batch_size: int
    policy_renderer_name: str
    policy_model_name: str
    preference_model_builder: PreferenceModelBuilder
    group_size: int
    tournament_pattern: TournamentPattern = TournamentPattern.ALL_PAIRS_BOTH_WAYS
    content_preprocessor: Callable[[str], str] | None = None
    matchup_group_size: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "tournament_pattern", TournamentPattern(self.tournament_pattern))

    async def __call__(self) -> tuple[PairwisePreferenceDataset, None]:
        renderer = get_renderer(self.policy_renderer_name, get_tokenizer(self.policy_model_name))
        train_rows, _ = self.comparison_builder.get_train_and_test_datasets()
        dataset = PairwisePreferenceDataset(
            self.comparison_builder,
            train_rows,
            self.batch_size,
            renderer,
            self.preference_model_builder(),
            self.group_size,
            self.tournament_pattern,
            self.content_preprocessor,
            self.matchup_group_size,
        )
        if len(dataset) == 0:
            raise ValueError(
                f"the RL prompt set has {len(train_rows)} rows, fewer than one batch of "
                f"{self.batch_size}; lower batch_size"
            )
        return dataset, None
