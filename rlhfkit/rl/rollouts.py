"""Rollouts: run a policy in the envs of a group, then score the group.

Sampling and scoring are separate steps so the training loop can run *all* groups' sampling concurrently
(one generation batch in the engine) and then all groups' scoring concurrently (batched judge passes).
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

from rlhfkit.completers import TokenCompleter
from rlhfkit.rl.types import Env, EnvGroupBuilder, Trajectory, TrajectoryGroup, Transition


async def do_single_rollout(policy: TokenCompleter, env: Env) -> Trajectory:
    ob, stop = await env.initial_observation()
    transitions = []
    while True:
        ac = await policy(ob, stop)
        step = await env.step(ac.tokens)
        transitions.append(Transition(ob, ac, step.reward, step.episode_done, step.metrics, step.logs))
        ob, stop = step.next_observation, step.next_stop_condition
        if step.episode_done:
            return Trajectory(transitions, final_ob=ob, stop_reason=ac.stop_reason)


async def sample_group(
    builder: EnvGroupBuilder, policy_for_env: Callable[[int], TokenCompleter]
) -> tuple[Sequence[Env], list[Trajectory]]:
    """Make the group's envs and roll out one episode in each, concurrently."""
    envs = await builder.make_envs()
    trajectories = await asyncio.gather(*(do_single_rollout(policy_for_env(k), env) for k, env in enumerate(envs)))
    return envs, list(trajectories)


async def score_group(builder: EnvGroupBuilder, envs: Sequence[Env], trajectories: list[Trajectory]) -> TrajectoryGroup:
    rewards_and_metrics = await builder.compute_group_rewards(trajectories, envs)
    if len(rewards_and_metrics) != len(trajectories):
        raise ValueError(
            f"{type(builder).__name__}.compute_group_rewards returned {len(rewards_and_metrics)} "
            f"rewards for {len(trajectories)} trajectories"
        )
    return TrajectoryGroup(
        trajectories, [float(r) for r, _ in rewards_and_metrics], [dict(m) for _, m in rewards_and_metrics]
    )


async def do_group_rollout(builder: EnvGroupBuilder, policy: TokenCompleter) -> TrajectoryGroup:
    """Sample and score one group with a single policy (convenience for evaluation and tests)."""
    envs, trajectories = await sample_group(builder, lambda _k: policy)
    return await score_group(builder, envs, trajectories)
