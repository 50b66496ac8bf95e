"""RL metrics: sampler-vs-trainer KL, the policy's KL from a reference, per-batch trajectory metrics (spec
5.10) and the sampling-client metrics of off-policy batches (spec 5.8). The KL penalty itself (spec 5.7) is in
data_processing: it makes new datums."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Sequence

import numpy as np

from rlhfkit.engine.types import Datum, TensorData
from rlhfkit.rl.types import EnvGroupBuilder, TrajectoryGroup
from rlhfkit.engine.clients import SamplingClient


def action_values(datum: Datum, key: str) -> np.ndarray:
    """The datum's `key` input at action positions (mask 1)."""
    mask = datum.loss_fn_inputs["mask"].to_numpy() > 0
    return datum.loss_fn_inputs[key].to_numpy()[mask]


def compute_kl_sample_train(data: list[Datum], training_logprobs: Sequence[TensorData]) -> dict[str, float]:
    """How far the trainer's logprobs (pre-update) are from the sampler's, over action tokens:
    v1 = mean(logp_sampler - logp_train), v2 = 0.5 * mean(diff^2); entropy = -mean(logp_sampler)."""
    diffs, sampler = [], []
    for datum, train_lp in zip(data, training_logprobs, strict=True):
        mask = datum.loss_fn_inputs["mask"].to_numpy() > 0
        sampler_lp = datum.loss_fn_inputs["logprobs"].to_numpy()[mask]
        diffs.append(sampler_lp - np.asarray(train_lp.to_numpy(), dtype=np.float64)[mask])
        sampler.append(sampler_lp)
    diff = np.concatenate(diffs) if diffs else np.zeros(0)
    if diff.size == 0:
        return {}
    return {
        "optim/kl_sample_train_v1": float(diff.mean()),
        "optim/kl_sample_train_v2": float(0.5 * np.mean(diff**2)),
        "optim/entropy": float(-np.concatenate(sampler).mean()),
    }


async def compute_reference_logprobs(data: list[Datum], sampling_client: SamplingClient) -> list[np.ndarray]:
    """Logprob of each datum's target tokens under another model (all requests issued concurrently)."""

    async def one(datum: Datum) -> np.ndarray:
        full = datum.model_input.append_int(int(datum.loss_fn_inputs["target_tokens"].to_numpy()[-1]))
        logprobs = await sampling_client.compute_logprobs_async(full)
        return np.asarray(logprobs[1:], dtype=np.float64)

    return list(await asyncio.gather(*(one(d) for d in data)))


async def compute_kl_policy_vs_reference(data: list[Datum], reference_sampling_client: SamplingClient) -> float:
    """Monte-Carlo KL(policy || reference) per action token: mean of logp_sampler - logp_reference over the
    action tokens of `data` (sampled from the policy at temperature 1)."""
    ref_logprobs = await compute_reference_logprobs(data, reference_sampling_client)
    diffs = [
        action_values(d, "logprobs") - ref[d.loss_fn_inputs["mask"].to_numpy() > 0]
        for d, ref in zip(data, ref_logprobs)
    ]
    diff = np.concatenate(diffs) if diffs else np.zeros(0)
    return float(diff.mean()) if diff.size else 0.0


def _trajectory_metrics(groups: list[TrajectoryGroup], prefix: str) -> dict[str, float]:
    episodes = [traj for g in groups for traj in g.trajectories_G]
    transitions = [t for traj in episodes for t in traj.transitions]
    total_turns = len(transitions)
    total_ac = sum(len(t.ac.tokens) for t in transitions)
    total_ob = sum(t.ob.length for t in transitions)
    metrics: dict[str, float] = {
        "ac_tokens_per_turn": total_ac / max(total_turns, 1),
        "ob_tokens_per_turn": total_ob / max(total_turns, 1),
        "turns_per_episode": total_turns / max(len(episodes), 1),
        "total_episodes": len(episodes),
        "total_turns": total_turns,
        "total_ac_tokens": total_ac,
        "total_ob_tokens": total_ob,
        "frac_truncated": sum(t.ac.stop_reason == "length" for t in transitions) / max(total_turns, 1),
        "reward/total": float(np.mean([r for g in groups for r in g.get_total_rewards()])) if episodes else 0.0,
    }
    # Means of the per-step and per-trajectory (group) metrics, e.g. win_minus_loss and format.
    values: dict[str, list[float]] = defaultdict(list)
    for t in transitions:
        for key, value in t.metrics.items():
            values[key].append(float(value))
    for g in groups:
        for traj_metrics in g.metrics_G:
            for key, value in traj_metrics.items():
                values[key].append(float(value))
    metrics.update({key: float(np.mean(v)) for key, v in values.items()})
    # Group-level reward shape: mixed groups carry signal; constant groups have zero advantage.
    constant = [len(set(g.get_total_rewards())) == 1 for g in groups]
    n_groups = max(len(groups), 1)
    metrics["by_group/frac_mixed"] = sum(not c for c in constant) / n_groups
    metrics["by_group/frac_all_good"] = (
        sum(c and g.get_total_rewards()[0] >= 0.5 for c, g in zip(constant, groups)) / n_groups
    )
    metrics["by_group/frac_all_bad"] = (
        sum(c and g.get_total_rewards()[0] < 0.5 for c, g in zip(constant, groups)) / n_groups
    )
    return {f"{prefix}/{key}": value for key, value in metrics.items()}


def compute_trajectory_metrics(
    trajectory_groups: list[TrajectoryGroup], builders: Sequence[EnvGroupBuilder]
) -> dict[str, float]:
    """`env/all/...` over the batch, plus `env/<tag>/...` for each logging tag that covers only part of it."""
    metrics = _trajectory_metrics(trajectory_groups, "env/all")
    by_tag: dict[str, list[TrajectoryGroup]] = defaultdict(list)
    for group, builder in zip(trajectory_groups, builders, strict=True):
        for tag in builder.logging_tags():
            by_tag[tag].append(group)
    for tag, groups in by_tag.items():
        if len(groups) < len(trajectory_groups):
            metrics.update(_trajectory_metrics(groups, f"env/{tag}"))
    return metrics


def compute_sampling_client_metrics(
    trained_step: int, sampler_steps: Sequence[int], sampling_seconds: Sequence[float]
) -> dict[str, float]:
    """Which policy versions sampled a batch (spec 5.8): `sampling_client/step_{max,min,mean}` (the optimizer
    steps the samplers' weights had seen), their staleness at training step `trained_step` (steps behind the
    policy being trained), and `time/sampling_time_{max,min,mean}` (each group's sampling plus judging)."""
    steps = np.asarray(sampler_steps, dtype=np.float64)
    seconds = np.asarray(sampling_seconds, dtype=np.float64)
    if steps.size == 0:
        return {}
    staleness = trained_step - steps
    return {
        "sampling_client/step_max": float(steps.max()),
        "sampling_client/step_min": float(steps.min()),
        "sampling_client/step_mean": float(steps.mean()),
        "sampling_client/staleness_max": float(staleness.max()),
        "sampling_client/staleness_mean": float(staleness.mean()),
        "time/sampling_time_max": float(seconds.max()),
        "time/sampling_time_min": float(seconds.min()),
        "time/sampling_time_mean": float(seconds.mean()),
    }
