"""RL data types (spec 11.2): environments, rollouts, and the datasets that hand out groups of envs.

An Env is one episode. An EnvGroupBuilder makes a *group* of envs that share a prompt; rewards that need
the whole group (e.g. a tournament between the group's replies) come from `compute_group_rewards`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

from rlhfkit.completers import StopCondition, TokensWithLogprobs
from rlhfkit.engine.types import ModelInput

Action = list[int]
Observation = ModelInput
Metrics = dict[str, float | int]
Logs = dict[str, Any]


@dataclass
class StepResult:
    reward: float
    episode_done: bool
    next_observation: Observation
    next_stop_condition: StopCondition
    metrics: Metrics = field(default_factory=dict)
    logs: Logs = field(default_factory=dict)


class Env(ABC):
    """A single episode. Envs are used once and then discarded."""

    @abstractmethod
    async def initial_observation(self) -> tuple[Observation, StopCondition]: ...

    @abstractmethod
    async def step(self, action: Action, *, extra: dict | None = None) -> StepResult: ...


@dataclass
class Transition:
    ob: Observation
    ac: TokensWithLogprobs
    reward: float
    episode_done: bool
    metrics: Metrics = field(default_factory=dict)
    logs: Logs = field(default_factory=dict)


@dataclass
class Trajectory:
    transitions: list[Transition]
    final_ob: Observation
    stop_reason: str | None = None


@dataclass
class TrajectoryGroup:
    """The trajectories of one env group with the group-level reward and metrics of each."""

    trajectories_G: list[Trajectory]
    final_rewards_G: list[float]
    metrics_G: list[Metrics]
    rollout_errors: list[Any] = field(default_factory=list)

    def get_total_rewards(self) -> list[float]:
        """Per trajectory: the sum of its step rewards plus its group reward."""
        return [
            sum(t.reward for t in traj.transitions) + final
            for traj, final in zip(self.trajectories_G, self.final_rewards_G, strict=True)
        ]


class EnvGroupBuilder(ABC):
    """Makes a group of envs and scores the group's trajectories together."""

    @abstractmethod
    async def make_envs(self) -> Sequence[Env]: ...

    async def compute_group_rewards(
        self, trajectory_group: list[Trajectory], env_group: Sequence[Env]
    ) -> list[tuple[float, Metrics]]:
        return [(0.0, {}) for _ in trajectory_group]

    async def cleanup(self) -> None:
        pass

    def logging_tags(self) -> list[str]:
        return []

    def reward_logs(self) -> Logs:
        """Details of the last `compute_group_rewards` for the human-readable logs (e.g. every matchup and
        its verdict). Local addition; empty by default."""
        return {}


class RLDataset(ABC):
    @abstractmethod
    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]: ...

    @abstractmethod
    def __len__(self) -> int: ...


class RLDatasetBuilder(ABC):
    @abstractmethod
    async def __call__(self) -> tuple[RLDataset, RLDataset | None]: ...
