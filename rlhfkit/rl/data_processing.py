"""Rewards -> advantages -> training datums (spec 5.4, 5.5), and the KL penalty on those datums (spec 5.7).

`prepare_training_data` is the one place a batch of judged groups becomes the datums a training step sends
(the reference's `prepare_minibatch`): the advantages are computed once by the caller (they also go to the
rollout logs), and the KL penalty returns new datums rather than editing the given ones.
"""

from __future__ import annotations

import logging

import numpy as np

from rlhfkit.engine.types import Datum, ModelInput, TensorData
from rlhfkit.rl.metrics import compute_reference_logprobs
from rlhfkit.rl.types import Trajectory, TrajectoryGroup
from rlhfkit.engine.clients import SamplingClient

logger = logging.getLogger(__name__)


def compute_advantages(trajectory_groups: list[TrajectoryGroup]) -> list[np.ndarray]:
    """Group-centred advantages: each trajectory's total reward minus its group's mean (no std scaling)."""
    advantages = []
    for group in trajectory_groups:
        rewards = np.asarray(group.get_total_rewards(), dtype=np.float64)
        advantages.append(rewards - rewards.mean())
    return advantages


def is_constant_reward_group(group: TrajectoryGroup) -> bool:
    """All of the group's trajectories got the same total reward (so every advantage is 0)."""
    return len(set(group.get_total_rewards())) <= 1


def groups_to_keep(trajectory_groups: list[TrajectoryGroup]) -> list[int]:
    """Indices of the groups whose rewards are not all equal (the others teach nothing); if every group is
    constant, the first one only, so the batch is not empty."""
    kept = [k for k, g in enumerate(trajectory_groups) if not is_constant_reward_group(g)]
    if not kept and trajectory_groups:
        logger.warning("every group has a constant reward; keeping one group")
        return [0]
    return kept


def remove_constant_reward_groups(trajectory_groups: list[TrajectoryGroup]) -> list[TrajectoryGroup]:
    """The groups of `groups_to_keep`."""
    return [trajectory_groups[k] for k in groups_to_keep(trajectory_groups)]


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


def _discounted_future_sum(x: np.ndarray, gamma: float) -> np.ndarray:
    out = np.zeros_like(x)
    running = 0.0
    for t in range(len(x) - 1, -1, -1):
        running = x[t] + gamma * running
        out[t] = running
    return out


async def incorporate_kl_penalty(
    data: list[Datum], base_sampling_client: SamplingClient, kl_penalty_coef: float, kl_discount_factor: float = 0.0
) -> tuple[list[Datum], dict[str, float]]:
    """New datums whose advantages are shifted towards the reference: d_t = (logp_sampler - logp_ref) on action
    tokens, advantage_t += coef * mask_t * (mean(d) - d_t) (its discounted future sum if kl_discount_factor > 0);
    and {"kl_policy_base": mean(d)}. The given datums are left as they are."""
    ref_logprobs = await compute_reference_logprobs(data, base_sampling_client)
    masks = [d.loss_fn_inputs["mask"].to_numpy().astype(np.float64) for d in data]
    diffs = [(d.loss_fn_inputs["logprobs"].to_numpy() - ref) * m for d, ref, m in zip(data, ref_logprobs, masks)]
    avg = sum(float(x.sum()) for x in diffs) / max(sum(float(m.sum()) for m in masks), 1.0)
    penalised = []
    for datum, diff, mask in zip(data, diffs, masks):
        penalty = kl_penalty_coef * mask * (avg - diff)
        if kl_discount_factor > 0:  # masked again so prompt positions never get an advantage
            penalty = _discounted_future_sum(penalty, kl_discount_factor) * mask
        advantages = datum.loss_fn_inputs["advantages"].to_numpy().astype(np.float64) + penalty
        inputs = {**datum.loss_fn_inputs, "advantages": TensorData.from_numpy(advantages.astype(np.float32))}
        penalised.append(Datum(datum.model_input, inputs))
    return penalised, {"kl_policy_base": avg}


async def prepare_training_data(
    trajectory_groups: list[TrajectoryGroup],
    advantages_P: list[np.ndarray],
    kl_reference_client: SamplingClient | None = None,
    kl_penalty_coef: float = 0.0,
    kl_discount_factor: float = 0.0,
) -> tuple[list[Datum], list[dict[str, int]], dict[str, float]]:
    """The datums of a batch of groups with their (already computed) advantages, with the KL penalty applied
    when a reference client is given; where each datum came from (assemble_training_data); the penalty's
    metrics."""
    data, metadata = assemble_training_data(trajectory_groups, advantages_P)
    if kl_reference_client is None or not data:
        return data, metadata, {}
    data, metrics = await incorporate_kl_penalty(data, kl_reference_client, kl_penalty_coef, kl_discount_factor)
    return data, metadata, metrics
