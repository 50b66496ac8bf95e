"""Rewards -> advantages -> training datums (spec 5.4, 5.5)."""

from __future__ import annotations

import logging

import numpy as np

from rlhfkit.engine.types import Datum, ModelInput, TensorData
from rlhfkit.rl.types import Trajectory, TrajectoryGroup

logger = logging.getLogger(__name__)


def compute_advantages(trajectory_groups: list[TrajectoryGroup]) -> list[np.ndarray]:
    """Group-centred advantages: each trajectory's total reward minus its group's mean (no std scaling)."""
    advantages = []
    for group in trajectory_groups:
        rewards = np.asarray(group.get_total_rewards(), dtype=np.float64)
        advantages.append(rewards - rewards.mean())
    return advantages


def remove_constant_reward_groups(trajectory_groups: list[TrajectoryGroup]) -> list[TrajectoryGroup]:
    """Drop groups whose trajectories all got the same total reward (they teach nothing); if every group is
    constant, keep the first so the batch is not empty."""
    kept = [g for g in trajectory_groups if len(set(g.get_total_rewards())) > 1]
    if not kept:
        logger.warning("every group has a constant reward; keeping one group")
        return trajectory_groups[:1]
    return kept


def _datum(tokens: list[int], logprobs: list[float], advantages: list[float], mask: list[float]) -> Datum:
    """Next-token shift: the model reads tokens[:-1] and each position is scored on the following token."""
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_list(tokens[1:], "int64"),
            "logprobs": TensorData.from_list(logprobs[1:], "float32"),
            "advantages": TensorData.from_list(advantages[1:], "float32"),
            "mask": TensorData.from_list(mask[1:], "float32"),
        },
    )


def trajectory_to_data(trajectory: Trajectory, traj_advantage: float) -> list[Datum]:
    """One datum per run of transitions whose observations extend the previous ob + ac (one datum for a
    single-turn episode). Observation tokens get logprob 0, advantage 0 and mask 0; action tokens get the
    sampler's logprobs, the trajectory's advantage and mask 1."""
    data: list[Datum] = []
    tokens: list[int] = []
    logprobs: list[float] = []
    advantages: list[float] = []
    mask: list[float] = []

    def flush() -> None:
        if len(tokens) >= 2:
            data.append(_datum(tokens, logprobs, advantages, mask))
        for values in (tokens, logprobs, advantages, mask):
            values.clear()

    for transition in trajectory.transitions:
        ob = transition.ob.to_ints()
        if ob[: len(tokens)] != tokens:  # the observation does not extend the sequence so far
            flush()
        new_ob = ob[len(tokens) :]
        ac = transition.ac
        if len(ac.logprobs) != len(ac.tokens):
            raise ValueError(f"action has {len(ac.tokens)} tokens but {len(ac.logprobs)} logprobs")
        tokens += new_ob + list(ac.tokens)
        logprobs += [0.0] * len(new_ob) + list(ac.logprobs)
        advantages += [0.0] * len(new_ob) + [float(traj_advantage)] * len(ac.tokens)
        mask += [0.0] * len(new_ob) + [1.0] * len(ac.tokens)
    flush()
    return data


def assemble_training_data(
    trajectory_groups: list[TrajectoryGroup],
    advantages_P: list[np.ndarray],
) -> tuple[list[Datum], list[dict[str, int]]]:
    """All datums of the batch, and for each datum the (group_idx, traj_idx) it came from."""
    data, metadata = [], []
    for group_idx, (group, advantages) in enumerate(zip(trajectory_groups, advantages_P, strict=True)):
        for traj_idx, (trajectory, advantage) in enumerate(zip(group.trajectories_G, advantages, strict=True)):
            for datum in trajectory_to_data(trajectory, float(advantage)):
                data.append(datum)
                metadata.append({"group_idx": group_idx, "traj_idx": traj_idx})
    return data, metadata


def remove_mask(datum: Datum) -> Datum:
    """The datum as sent to forward_backward: the RL losses take target_tokens, logprobs and advantages."""
    return Datum(datum.model_input, {k: v for k, v in datum.loss_fn_inputs.items() if k != "mask"})
