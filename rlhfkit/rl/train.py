"""Stage 3: synchronous on-policy RL (spec 5.9).

Each iteration: evaluate (every `eval_every`), sample a group of replies per prompt from the current
policy, score the groups (e.g. a preference-model tournament), centre rewards within each group to get
advantages, and take one importance-sampling policy-gradient step per substep. Checkpoints are saved every
`save_every` iterations and at the end; a killed run resumes from its last checkpoint, optimizer included.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from rlhfkit.utils.async_utils import run_or_await
from rlhfkit import checkpoint_utils
from rlhfkit.completers import TinkerTokenCompleter
from rlhfkit.engine import ServiceClient
from rlhfkit.engine.types import AdamParams, Datum
from rlhfkit.evaluators import EvaluatorBuilder, SamplingClientEvaluator
from rlhfkit.model_info import warn_if_renderer_not_recommended
from rlhfkit.rl import data_processing, metrics as rl_metrics
from rlhfkit.rl.rollout_logging import (iteration_dir, rollout_summary_records, write_rollout_summaries,
                                        write_train_html)
from rlhfkit.rl.rollouts import sample_group, score_group
from rlhfkit.rl.types import EnvGroupBuilder, RLDatasetBuilder, TrajectoryGroup
from rlhfkit.utils import ml_log

logger = logging.getLogger(__name__)

INIT_SAMPLER_DIR = "init_sampler"  # the starting weights, kept for the policy-vs-init KL

PLOT_PANELS = [  # metrics.png: one panel per list
    ["env/all/reward/total", "env/all/win_minus_loss"],
    ["test/win_rate"],
    ["kl/policy_vs_init", "optim/kl_sample_train_v1"],
    ["env/all/ac_tokens_per_turn"],
    ["env/all/frac_truncated", "env/all/format"],
    ["time/sample", "time/judge", "time/train"],
]


@dataclass
class KLReferenceConfig:
    """The reference model of the KL penalty: a base model, optionally with a saved state's weights."""

    base_model: str
    load_checkpoint_path: str | None = None


@dataclass
class Config:
    learning_rate: float
    dataset_builder: RLDatasetBuilder
    model_name: str
    recipe_name: str
    max_tokens: int
    log_path: str
    eval_every: int = 20
    save_every: int = 20
    evaluator_builders: list[EvaluatorBuilder] = field(default_factory=list)
    load_checkpoint_path: str | None = None  # initial weights (weights only, fresh optimizer)
    renderer_name: str | None = None  # metadata only; envs use the dataset builder's renderer
    wandb_project: str | None = None
    wandb_name: str | None = None
    kl_penalty_coef: float = 0.0
    kl_discount_factor: float = 0.0
    kl_reference_config: KLReferenceConfig | None = None
    loss_fn: str = "importance_sampling"  # or "ppo", "cispo"
    loss_fn_config: dict[str, Any] | None = None
    num_substeps: int = 1
    lora_rank: int = 32
    temperature: float = 1.0
    remove_constant_reward_groups: bool = False
    num_groups_to_log: int = 4
    rollout_json_export: bool = True
    ttl_seconds: int | None = 604800
    max_steps: int | None = None
    base_url: str | None = None
    # Local additions
    seed: int | None = None  # seeds the LoRA init and every rollout's sampling (reproducible, also on resume)
    policy_kl_num_sequences: int = 16  # sequences per iteration for kl/policy_vs_init (0 = off)
    sampler: str | None = None  # rollouts: "local" or "vllm" (ServiceClient's sampler; None: RLHFKIT_SAMPLER)
    # Guard against a sampler that did not apply the policy's adapter: the largest |trainer logprob - sampler
    # logprob| over the first substep's sampled tokens (optim/first_substep_max_abs_logratio) above this stops
    # the run (nats; 0 = off). fp32 engines agree to ~1e-6; bf16 engines differ by up to a few tenths on rare
    # tokens; an unapplied adapter differs by whatever training has moved the policy.
    sampler_logprob_tolerance: float = 1.0
    # Engine backend (ServiceClient): "local" or "ray" (None: RLHFKIT_BACKEND), the Ray cluster's address (None:
    # a local instance; "auto": join), data-parallel training workers and inference engines (None: defaults).
    backend: str | None = None
    ray_address: str | None = None
    num_train_workers: int | None = None
    num_samplers: int | None = None


class SamplerMismatchError(RuntimeError):
    """The sampler's logprobs of its own tokens differ from the trainer's: its weights are not the policy's."""


def _rollout_seed(seed: int | None, iteration: int, group_idx: int, env_idx: int) -> int | None:
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, iteration, group_idx, env_idx]).generate_state(1)[0])


def _create_training_client(config: Config, service: ServiceClient, resume: Any) -> Any:
    if resume is not None:
        logger.info("Resuming at iteration %d from %s", resume.batch, resume.state_path)
        return service.create_training_client_from_state_with_optimizer(resume.state_path)
    if config.load_checkpoint_path:
        logger.info("Starting from the weights of %s (fresh optimizer)", config.load_checkpoint_path)
        return service.create_training_client_from_state(config.load_checkpoint_path)
    return service.create_lora_training_client(config.model_name, rank=config.lora_rank, seed=config.seed)


def _init_sampling_client(config: Config, service: ServiceClient, training_client: Any, log_path: str,
                          resumed: bool) -> Any:
    """A sampler on the run's starting weights (saved once at the start, reused on resume)."""
    if config.policy_kl_num_sequences <= 0:
        return None
    path = Path(log_path) / INIT_SAMPLER_DIR
    if not resumed:
        training_client.save_weights_for_sampler(str(path.resolve())).result()
    elif not path.exists():
        logger.warning("%s is missing, so kl/policy_vs_init is not logged in this run", path)
        return None
    return service.create_sampling_client(model_path=str(path.resolve()))


def _kl_reference_client(config: Config, service: ServiceClient) -> Any:
    if config.kl_penalty_coef <= 0:
        return None
    ref = config.kl_reference_config
    if ref is None:
        raise ValueError("kl_penalty_coef > 0 needs kl_reference_config=KLReferenceConfig(base_model=...)")
    if ref.load_checkpoint_path is None:
        return service.create_sampling_client(base_model=ref.base_model)
    return service.create_sampling_client(model_path=ref.load_checkpoint_path)  # a state folder holds the adapter


async def _evaluate(evaluators: Sequence[Any], sampling_client: Any, training_client: Any) -> dict[str, float]:
    """All evaluators concurrently on the current weights (so their sampling calls share batches)."""
    results = await asyncio.gather(*(
        evaluator(sampling_client if isinstance(evaluator, SamplingClientEvaluator) else training_client)
        for evaluator in evaluators))
    return {key: value for result in results for key, value in result.items()}


def _check_sampler(config: Config, max_abs_logratio: float, sampler_name: str) -> None:
    if 0 < config.sampler_logprob_tolerance < max_abs_logratio:
        raise SamplerMismatchError(
            f"the sampler ({sampler_name}) gave its sampled tokens logprobs up to {max_abs_logratio:.4g} nats away "
            f"from the trainer's, above sampler_logprob_tolerance={config.sampler_logprob_tolerance}: the "
            f"sampler is not running the policy's weights (an adapter the inference engine did not apply, e.g. "
            f"on a module it does not support; check the engine's warnings, or train without that module). "
            f"Raise sampler_logprob_tolerance only if the engines legitimately differ (low precision).")


def sampler_name(sampling_client: Any) -> str:
    """How the error names a sampler: its adapter (id and checkpoint folder) where it has one."""
    parts = [f"{k}={getattr(sampling_client, k)}" for k in ("adapter_id", "adapter_path")
             if getattr(sampling_client, k, None) is not None]
    return ", ".join(parts) if parts else f"{type(sampling_client).__name__} on the policy's current weights"


def _train_step(config: Config, training_client: Any, data: list[Datum], sampler: str) -> dict[str, float]:
    """`num_substeps` equal splits of the batch, each one forward_backward and one Adam step. Before the first
    step, the trainer's logprobs of the sampled tokens are checked against the sampler's (on-policy they are
    equal): a mismatch stops the run (`sampler_logprob_tolerance`)."""
    batch = [data_processing.remove_mask(d) for d in data]
    splits = [s for s in np.array_split(np.arange(len(batch)), config.num_substeps) if len(s)]
    adam = AdamParams(learning_rate=config.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
    train_logprobs: list[Any] = [None] * len(batch)
    metrics: dict[str, float] = {"optim/loss:sum": 0.0}
    for substep, indices in enumerate(splits):
        output = training_client.forward_backward([batch[j] for j in indices], config.loss_fn,
                                                  config.loss_fn_config).result()
        for j, out in zip(indices, output.loss_fn_outputs):
            train_logprobs[j] = out["logprobs"]
        metrics["optim/loss:sum"] += output.metrics.get("loss:sum", 0.0)
        if substep == 0:  # on-policy: the trainer's logprobs must equal the sampler's (ratio 1)
            diffs = [np.abs(rl_metrics.action_values(data[j], "logprobs")
                            - train_logprobs[j].to_numpy()[data[j].loss_fn_inputs["mask"].to_numpy() > 0])
                     for j in indices]
            metrics["optim/first_substep_max_abs_logratio"] = float(np.concatenate(diffs).max(initial=0.0))
            _check_sampler(config, metrics["optim/first_substep_max_abs_logratio"], sampler)
        step = training_client.optim_step(adam).result()
        metrics.update(step.metrics or {})
    metrics.update(rl_metrics.compute_kl_sample_train(data, train_logprobs))
    return metrics


def _log_rollouts(config: Config, log_path: str, iteration: int, groups: list[TrajectoryGroup],
                  builders: Sequence[EnvGroupBuilder], advantages: list[np.ndarray], tokenizer: Any) -> None:
    folder = iteration_dir(log_path, iteration)
    n = min(config.num_groups_to_log, len(groups))
    if n > 0:
        write_train_html(folder / "train.html", iteration, groups[:n], builders[:n], advantages[:n], tokenizer)
    if config.rollout_json_export:
        write_rollout_summaries(folder / "train_rollout_summaries.jsonl",
                                rollout_summary_records(groups, builders, iteration, sampling_client_step=iteration))


async def _run_iteration(config: Config, i: int, dataset: Any, sampling_client: Any, training_client: Any,
                         evaluators: list, init_client: Any, kl_reference_client: Any, tokenizer: Any,
                         log_path: str) -> dict[str, float]:
    """One RL iteration on the current weights; returns its metrics (the weights are updated in place)."""
    metrics: dict[str, float] = {"progress/batch": i, "optim/lr": config.learning_rate}
    if config.eval_every > 0 and i % config.eval_every == 0 and evaluators:
        t0 = time.time()
        metrics.update(await _evaluate(evaluators, sampling_client, training_client))
        metrics["time/eval"] = time.time() - t0

    # Rollouts: every env of every group at once, so the engine samples them in one generation batch.
    builders = list(dataset.get_batch(i))
    t0 = time.time()

    def policy_for(group_idx: int) -> Callable[[int], TinkerTokenCompleter]:
        return lambda env_idx: TinkerTokenCompleter(sampling_client, config.max_tokens, config.temperature,
                                                    seed=_rollout_seed(config.seed, i, group_idx, env_idx))

    sampled = await asyncio.gather(*(sample_group(b, policy_for(g)) for g, b in enumerate(builders)))
    metrics["time/sample"] = time.time() - t0
    # Rewards: every group's judging at once (batched preference-model passes).
    t0 = time.time()
    groups = list(await asyncio.gather(*(score_group(b, envs, trajectories)
                                         for b, (envs, trajectories) in zip(builders, sampled))))
    await asyncio.gather(*(b.cleanup() for b in builders))
    metrics["time/judge"] = time.time() - t0

    metrics.update(rl_metrics.compute_trajectory_metrics(groups, builders))
    _log_rollouts(config, log_path, i, groups, builders, data_processing.compute_advantages(groups), tokenizer)
    if config.remove_constant_reward_groups:
        groups = data_processing.remove_constant_reward_groups(groups)
    advantages = data_processing.compute_advantages(groups)
    data, _metadata = data_processing.assemble_training_data(groups, advantages)
    if not data:
        logger.warning("iteration %d: no training data (every reply is empty); skipping the update", i)
        return metrics
    if init_client is not None:  # reward-hacking watch: how far the policy has drifted from its start
        metrics["kl/policy_vs_init"] = await rl_metrics.compute_kl_policy_vs_reference(
            data[: config.policy_kl_num_sequences], init_client)
    if kl_reference_client is not None:
        metrics.update(await rl_metrics.incorporate_kl_penalty(data, kl_reference_client, config.kl_penalty_coef,
                                                               config.kl_discount_factor))
    t0 = time.time()
    metrics.update(_train_step(config, training_client, data, sampler_name(sampling_client)))
    metrics["time/train"] = time.time() - t0
    return metrics


async def main_async(config: Config) -> None:
    if config.num_substeps < 1:
        raise ValueError(f"num_substeps must be >= 1, got {config.num_substeps}")
    log_path = str(Path(config.log_path).expanduser().resolve())
    resume = checkpoint_utils.get_last_checkpoint(log_path)
    start_batch = int(resume.batch) if resume is not None else 0
    ml_logger = ml_log.setup_logging(log_path, wandb_project=config.wandb_project, wandb_name=config.wandb_name,
                                     config=config, start_step=start_batch, plot_panels=PLOT_PANELS)
    try:
        await _train(config, log_path, resume, start_batch, ml_logger)
    finally:
        ml_logger.close()


async def _train(config: Config, log_path: str, resume: Any, start_batch: int, ml_logger: Any) -> None:
    warn_if_renderer_not_recommended(config.model_name, config.renderer_name)
    if config.seed is not None:
        random.seed(config.seed + start_batch)  # the engine's fallback sampling seeds (evaluators)
    service = ServiceClient(base_url=config.base_url, sampler=config.sampler, backend=config.backend,
                            ray_address=config.ray_address, num_train_workers=config.num_train_workers,
                            num_samplers=config.num_samplers)
    training_client = _create_training_client(config, service, resume)
    init_client = _init_sampling_client(config, service, training_client, log_path, resumed=resume is not None)
    kl_reference_client = _kl_reference_client(config, service)
    tokenizer = training_client.get_tokenizer()
    dataset, _ = await config.dataset_builder()
    evaluators = [build() for build in config.evaluator_builders]
    end_batch = len(dataset) if config.max_steps is None else min(config.max_steps, len(dataset))
    if start_batch >= end_batch:
        logger.info("Training was already complete (%d of %d iterations done)", start_batch, end_batch)
        return

    sampling_client = training_client.save_weights_and_get_sampling_client()
    progress = tqdm(range(start_batch, end_batch), initial=start_batch, total=end_batch, desc=config.recipe_name,
                    unit="it", dynamic_ncols=True)
    for i in progress:
        t_start = time.time()
        metrics = await _run_iteration(config, i, dataset, sampling_client, training_client, evaluators,
                                       init_client, kl_reference_client, tokenizer, log_path)
        t0 = time.time()
        sampling_client = training_client.save_weights_and_get_sampling_client()  # the updated weights
        metrics["time/sync_weights"] = time.time() - t0
        metrics["progress/done_frac"] = (i + 1) / end_batch
        metrics["time/total"] = time.time() - t_start
        # Log first, then checkpoint: a kill in between re-runs this iteration and its record is replaced.
        ml_logger.log_metrics(metrics, step=i)
        progress.set_postfix(reward=f"{metrics['env/all/reward/total']:+.3f}",
                             ac_tokens=f"{metrics['env/all/ac_tokens_per_turn']:.0f}",
                             kl_init=f"{metrics.get('kl/policy_vs_init', float('nan')):.4f}")
        # Periodic checkpoint (skipped when it would coincide with the final one).
        if config.save_every > 0 and (i + 1) % config.save_every == 0 and i + 1 < end_batch:
            checkpoint_utils.save_checkpoint(training_client, f"{i + 1:06d}", log_path, {"batch": i + 1},
                                             kind="both", ttl_seconds=config.ttl_seconds)
    progress.close()
    checkpoint_utils.save_checkpoint(training_client, "final", log_path, {"batch": end_batch}, kind="both")


def main(config: Config) -> Any:
    """Run RL. Outside an event loop this runs to completion; inside one it returns a coroutine to await."""
    return run_or_await(main_async(config))
