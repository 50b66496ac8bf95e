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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from tqdm import tqdm

from rlhfkit.checkpoint_manager import CheckpointManager
from rlhfkit.compat import compat_setting, warn_ignored_fields
from rlhfkit.completers import TinkerTokenCompleter
from rlhfkit.config import ConfigError, at_least, between, positive, setting, validate
from rlhfkit.engine import ServiceClient
from rlhfkit.engine.types import AdamParams, Datum
from rlhfkit.evaluators import EvaluatorBuilder, SamplingClientEvaluator
from rlhfkit.model_info import warn_if_renderer_not_recommended
from rlhfkit.rl import data_processing, metrics as rl_metrics
from rlhfkit.rl.rollout_logging import iteration_dir, rollout_summary_records, write_rollout_summaries, write_train_html
from rlhfkit.rl.rollouts import sample_group, score_group
from rlhfkit.rl.types import EnvGroupBuilder, RLDatasetBuilder, TrajectoryGroup
from rlhfkit.utils import ml_log
from rlhfkit.utils.async_utils import run_or_await
from rlhfkit.utils.timing import Timer
from rlhfkit.utils.nonfinite import NonFiniteGuard, describe_rows
from rlhfkit.utils.run_lock import RunLock

logger = logging.getLogger(__name__)

INIT_SAMPLER_DIR = "init_sampler"  # the starting weights, kept for the policy-vs-init KL

PLOT_PANELS = [  # metrics.png: one panel per list
    ["env/all/reward/total", "env/all/win_minus_loss"],
    ["test/win_rate", "test/win_rate_symmetric"],
    ["kl/policy_vs_init", "optim/kl_sample_train_v1"],
    ["env/all/ac_tokens_per_turn"],
    ["env/all/frac_truncated", "env/all/format"],
    ["time/sample", "time/judge", "time/train"],
]


@dataclass(frozen=True)
class KLReferenceConfig:
    """The reference model of the KL penalty: a base model, optionally with a saved state's weights."""

    base_model: str
    load_checkpoint_path: str | None = None


@dataclass
class Config:
    """The RL loop's settings."""

    learning_rate: float = setting(help="learning rate (constant)", check=positive)
    dataset_builder: RLDatasetBuilder = setting(help="frozen-dataclass builder of the RL prompt dataset")
    model_name: str = setting(help="base model (see rlhfkit pipeline --help, base_model)")
    recipe_name: str = setting(help="name shown on the progress bar and in the logs")
    max_tokens: int = setting(help="longest sampled reply in tokens", check=at_least(1))
    log_path: str = setting(help="run folder: metrics.jsonl, checkpoints, rollouts, logs")
    eval_every: int = setting(20, "evaluate every this many iterations (0: off)", check=at_least(0))
    save_every: int = setting(20, "checkpoint every this many iterations (0: only the final one)", check=at_least(0))
    evaluator_builders: list[EvaluatorBuilder] = setting(
        help="evaluators run every eval_every iterations", default_factory=list
    )
    load_checkpoint_path: str | None = setting(None, "initial weights (weights only, fresh optimizer)")
    renderer_name: str | None = setting(None, "metadata only; envs use the dataset builder's renderer")
    wandb_project: str | None = setting(None, "Weights & Biases project (None: off)")
    wandb_name: str | None = setting(None, "Weights & Biases run name")
    kl_penalty_coef: float = setting(
        0.0, "> 0: penalise each reply token's log-ratio to the reference (spec 5.7)", check=at_least(0)
    )
    kl_discount_factor: float = setting(0.0, "discount of the KL penalty over later tokens", check=between(0, 1))
    kl_reference_config: KLReferenceConfig | None = setting(None, "the KL penalty's reference model")
    loss_fn: Literal["importance_sampling", "ppo", "cispo"] = setting("importance_sampling", "policy-gradient loss")
    loss_fn_config: dict[str, Any] | None = setting(None, "the loss's parameters (e.g. clip thresholds)")
    num_substeps: int = setting(1, "optimizer steps per iteration (the batch split evenly)", check=at_least(1))
    lora_rank: int = setting(32, "LoRA rank", check=at_least(1))
    temperature: float = setting(1.0, "sampling temperature of the rollouts", check=positive)
    remove_constant_reward_groups: bool = setting(False, "drop groups whose replies all got the same reward")
    num_groups_to_log: int = setting(4, "groups per iteration written to train.html", check=at_least(0))
    rollout_json_export: bool = setting(True, "write every iteration's train_rollout_summaries.jsonl")
    max_steps: int | None = setting(
        None, "stop after this many iterations (None: the whole dataset)", check=at_least(0)
    )
    base_url: str | None = setting(None, "the service address; only None (the local engine) is supported")
    seed: int | None = setting(None, "seeds the LoRA init and every rollout's sampling (reproducible, also on resume)")
    policy_kl_num_sequences: int = setting(
        16, "sequences per iteration for kl/policy_vs_init (0: off)", check=at_least(0)
    )
    sampler: Literal["local", "vllm"] | None = setting(None, "rollouts: 'local' or 'vllm' (None: $RLHFKIT_SAMPLER)")
    max_nonfinite_in_a_row: int = setting(
        3,
        "stop after this many iterations in a row with a NaN/inf loss or gradient (each such update is skipped)",
        check=at_least(1),
    )
    sampler_logprob_tolerance: float = setting(
        0.05,
        "guard against a sampler that did not apply the policy's adapter: stop when the mean of (sampler logprob - "
        "trainer logprob) over the first substep's sampled tokens (optim/first_substep_kl_sample_train, an estimate "
        "of KL(sampler || trainer) in nats per token) exceeds this (0: off). Precision noise is unbiased and "
        "averages out (fp32 ~1e-6, bf16 ~0.01 on SmolLM2); another model's samples give a positive KL",
        check=at_least(0),
    )
    backend: Literal["local", "ray"] | None = setting(None, "engine backend: 'local' or 'ray' (None: $RLHFKIT_BACKEND)")
    ray_address: str | None = setting(None, "backend=ray: None starts a local Ray instance; 'auto' joins a cluster")
    num_train_workers: int | None = setting(
        None, "backend=ray: data-parallel training workers (None: one per GPU, else 1)", check=at_least(1)
    )
    num_samplers: int | None = setting(None, "backend=ray: inference-engine actors (None: 1)", check=at_least(1))
    ttl_seconds: int | None = compat_setting("ttl_seconds", 604800)

    def __post_init__(self) -> None:
        validate(self)
        warn_ignored_fields(self)
        if self.kl_penalty_coef > 0 and self.kl_reference_config is None:
            raise ConfigError(
                "kl_reference_config", None, "kl_penalty_coef > 0 needs KLReferenceConfig(base_model=...)"
            )


class SamplerMismatchError(RuntimeError):
    """The sampler's logprobs of its own tokens differ from the trainer's: its weights are not the policy's."""


def _rollout_seed(seed: int | None, iteration: int, group_idx: int, env_idx: int) -> int | None:
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, iteration, group_idx, env_idx]).generate_state(1)[0])


def _init_sampling_client(
    config: Config, service: ServiceClient, training_client: Any, log_path: str, resumed: bool
) -> Any:
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
    if ref.load_checkpoint_path is None:
        return service.create_sampling_client(base_model=ref.base_model)
    return service.create_sampling_client(model_path=ref.load_checkpoint_path)  # a state folder holds the adapter


async def _evaluate(evaluators: Sequence[Any], sampling_client: Any, training_client: Any) -> dict[str, float]:
    """All evaluators concurrently on the current weights (so their sampling calls share batches)."""
    results = await asyncio.gather(
        *(
            evaluator(sampling_client if isinstance(evaluator, SamplingClientEvaluator) else training_client)
            for evaluator in evaluators
        )
    )
    return {key: value for result in results for key, value in result.items()}


def _check_sampler(config: Config, kl: float, max_abs_logratio: float, sampler_name: str) -> None:
    """Stop when the sampler's tokens are more likely under the sampler than under the trainer by more than the
    tolerance on average: tokens drawn from p_sampler give E[log p_sampler - log p_trainer] = KL(sampler || trainer)
    >= 0, zero when both run the same weights. The mean, not the largest single difference, is compared: low
    precision moves single tokens' logprobs by up to about a nat (seen in bf16) but not their average."""
    if 0 < config.sampler_logprob_tolerance < kl:
        raise SamplerMismatchError(
            f"the sampler ({sampler_name}) gave its sampled tokens logprobs {kl:.4g} nats per token higher on average "
            f"than the trainer's (largest single difference {max_abs_logratio:.4g}), above "
            f"sampler_logprob_tolerance={config.sampler_logprob_tolerance}: the sampler is not running the policy's "
            f"weights (an adapter the inference engine did not apply, e.g. on a module it does not support; check "
            f"the engine's warnings, or train without that module)."
        )


def sampler_name(sampling_client: Any) -> str:
    """How the error names a sampler: its adapter (id and checkpoint folder) where it has one."""
    parts = [
        f"{k}={getattr(sampling_client, k)}"
        for k in ("adapter_id", "adapter_path")
        if getattr(sampling_client, k, None) is not None
    ]
    return ", ".join(parts) if parts else f"{type(sampling_client).__name__} on the policy's current weights"


def _train_step(config: Config, training_client: Any, data: list[Datum], sampler: str) -> dict[str, float]:
    """`num_substeps` equal splits of the batch, each one forward_backward and one Adam step. Before the first
    step, the trainer's logprobs of the sampled tokens are checked against the sampler's (on-policy they are
    equal): a sampler that runs other weights stops the run (`_check_sampler`)."""
    batch = [data_processing.remove_mask(d) for d in data]
    splits = [s for s in np.array_split(np.arange(len(batch)), config.num_substeps) if len(s)]
    adam = AdamParams(learning_rate=config.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
    train_logprobs: list[Any] = [None] * len(batch)
    metrics: dict[str, float] = {"optim/loss:sum": 0.0, "optim/skipped_nonfinite": 0.0}
    for substep, indices in enumerate(splits):
        output = training_client.forward_backward(
            [batch[j] for j in indices], config.loss_fn, config.loss_fn_config
        ).result()
        for j, out in zip(indices, output.loss_fn_outputs):
            train_logprobs[j] = out["logprobs"]
        metrics["optim/loss:sum"] += output.metrics.get("loss:sum", 0.0)
        if substep == 0:  # on-policy: the trainer's logprobs must equal the sampler's (ratio 1)
            diff = np.concatenate(
                [
                    rl_metrics.action_values(data[j], "logprobs")
                    - train_logprobs[j].to_numpy()[data[j].loss_fn_inputs["mask"].to_numpy() > 0]
                    for j in indices
                ]
            )
            metrics["optim/first_substep_max_abs_logratio"] = float(np.abs(diff).max(initial=0.0))
            metrics["optim/first_substep_kl_sample_train"] = float(diff.mean()) if diff.size else 0.0
            _check_sampler(
                config,
                metrics["optim/first_substep_kl_sample_train"],
                metrics["optim/first_substep_max_abs_logratio"],
                sampler,
            )
        step = training_client.optim_step(adam).result()
        skipped = metrics["optim/skipped_nonfinite"] + (step.metrics or {}).get("optim/skipped_nonfinite", 0.0)
        metrics.update({**(step.metrics or {}), "optim/skipped_nonfinite": skipped})
    metrics.update(rl_metrics.compute_kl_sample_train(data, train_logprobs))
    return metrics


def _log_rollouts(
    config: Config,
    log_path: str,
    iteration: int,
    groups: list[TrajectoryGroup],
    builders: Sequence[EnvGroupBuilder],
    advantages: list[np.ndarray],
    tokenizer: Any,
) -> None:
    folder = iteration_dir(log_path, iteration)
    n = min(config.num_groups_to_log, len(groups))
    if n > 0:
        write_train_html(folder / "train.html", iteration, groups[:n], builders[:n], advantages[:n], tokenizer)
    if config.rollout_json_export:
        write_rollout_summaries(
            folder / "train_rollout_summaries.jsonl",
            rollout_summary_records(groups, builders, iteration, sampling_client_step=iteration),
        )


async def _run_iteration(
    config: Config,
    i: int,
    dataset: Any,
    sampling_client: Any,
    training_client: Any,
    evaluators: list,
    init_client: Any,
    kl_reference_client: Any,
    tokenizer: Any,
    log_path: str,
    timer: Timer,
    nonfinite: NonFiniteGuard,
) -> dict[str, float]:
    """One RL iteration on the current weights; returns its metrics (the weights are updated in place)."""
    metrics: dict[str, float] = {"progress/batch": i, "optim/lr": config.learning_rate}
    if config.eval_every > 0 and i % config.eval_every == 0 and evaluators:
        with timer.span("eval"):
            metrics.update(await _evaluate(evaluators, sampling_client, training_client))

    # Rollouts: every env of every group at once, so the engine samples them in one generation batch.
    builders = list(dataset.get_batch(i))

    def policy_for(group_idx: int) -> Callable[[int], TinkerTokenCompleter]:
        return lambda env_idx: TinkerTokenCompleter(
            sampling_client,
            config.max_tokens,
            config.temperature,
            seed=_rollout_seed(config.seed, i, group_idx, env_idx),
        )

    with timer.span("sample"):
        sampled = await asyncio.gather(*(sample_group(b, policy_for(g)) for g, b in enumerate(builders)))
    # Rewards: every group's judging at once (batched preference-model passes).
    with timer.span("judge"):
        groups = list(
            await asyncio.gather(
                *(score_group(b, envs, trajectories) for b, (envs, trajectories) in zip(builders, sampled, strict=True))
            )
        )
        await asyncio.gather(*(b.cleanup() for b in builders))

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
            data[: config.policy_kl_num_sequences], init_client
        )
    if kl_reference_client is not None:
        metrics.update(
            await rl_metrics.incorporate_kl_penalty(
                data, kl_reference_client, config.kl_penalty_coef, config.kl_discount_factor
            )
        )
    with timer.span("train"):
        metrics.update(_train_step(config, training_client, data, sampler_name(sampling_client)))
    nonfinite.check(i, metrics["optim/loss:sum"], metrics, lambda: describe_rows(data, tokenizer))
    return metrics


async def main_async(config: Config) -> None:
    log_path = str(Path(config.log_path).expanduser().resolve())
    checkpoints = CheckpointManager(Path(log_path), config.save_every)
    with RunLock(log_path):
        resume = checkpoints.last()
        start_batch = int(resume.batch) if resume is not None else 0
        ml_logger = ml_log.setup_logging(
            log_path,
            wandb_project=config.wandb_project,
            wandb_name=config.wandb_name,
            config=config,
            start_step=start_batch,
            plot_panels=PLOT_PANELS,
        )
        try:
            await _train(config, log_path, checkpoints, start_batch, ml_logger)
        finally:
            ml_logger.close()


async def _train(
    config: Config, log_path: str, checkpoints: CheckpointManager, start_batch: int, ml_logger: Any
) -> None:
    warn_if_renderer_not_recommended(config.model_name, config.renderer_name)
    if config.seed is not None:
        random.seed(config.seed + start_batch)  # the engine's fallback sampling seeds (evaluators)
    service = ServiceClient(
        base_url=config.base_url,
        sampler=config.sampler,
        backend=config.backend,
        ray_address=config.ray_address,
        num_train_workers=config.num_train_workers,
        num_samplers=config.num_samplers,
    )
    training_client, resume = checkpoints.training_client(
        service, config.model_name, config.lora_rank, config.load_checkpoint_path, seed=config.seed
    )
    if resume is not None:
        logger.info("Resuming at iteration %d from %s", resume.batch, resume.state_path)
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
    nonfinite = NonFiniteGuard(config.max_nonfinite_in_a_row, log_path)
    progress = tqdm(
        range(start_batch, end_batch),
        initial=start_batch,
        total=end_batch,
        desc=config.recipe_name,
        unit="it",
        dynamic_ncols=True,
    )
    for i in progress:
        timer = Timer()
        metrics = await _run_iteration(
            config,
            i,
            dataset,
            sampling_client,
            training_client,
            evaluators,
            init_client,
            kl_reference_client,
            tokenizer,
            log_path,
            timer,
            nonfinite,
        )
        with timer.span("sync_weights"):
            sampling_client = training_client.save_weights_and_get_sampling_client()  # the updated weights
        metrics["progress/done_frac"] = (i + 1) / end_batch
        metrics.update(timer.total())
        # Log first, then checkpoint: a kill in between re-runs this iteration and its record is replaced.
        ml_logger.log_metrics(metrics, step=i)
        progress.set_postfix(
            reward=f"{metrics['env/all/reward/total']:+.3f}",
            ac_tokens=f"{metrics['env/all/ac_tokens_per_turn']:.0f}",
            kl_init=f"{metrics.get('kl/policy_vs_init', float('nan')):.4f}",
        )
        # Periodic checkpoint of the state before iteration i + 1 (skipped when it would be the final one).
        if i + 1 < end_batch and checkpoints.due(i + 1):
            checkpoints.save(training_client, f"{i + 1:06d}", {"batch": i + 1})
    progress.close()
    checkpoints.save(training_client, "final", {"batch": end_batch})


def main(config: Config) -> Any:
    """Run RL. Outside an event loop this runs to completion; inside one it returns a coroutine to await."""
    return run_or_await(main_async(config))
