"""Stage 3: RL against a reward (spec 5.8, 5.9): the synchronous on-policy loop, and its asynchronous and
streaming forms.

Synchronous (the default, as the tutorial; `_sync_loop`, `_run_iteration`). Each iteration: evaluate (every
`eval_every`), sample a group of replies per prompt from the current policy, judge every group (e.g. a
preference-model tournament; all groups' judgements go through the judge's batcher together), centre rewards
within each group to get advantages, and take one importance-sampling policy-gradient step per substep.

Asynchronous (`async_config=AsyncConfig(max_steps_off_policy, groups_per_batch)`) and streaming
(`stream_minibatch_config=StreamMinibatchConfig(groups_per_batch, num_minibatches)`), both in `_Pipeline`:
sampling, judging, training and evaluation run concurrently as tasks of one event loop (so on the Ray backend
on different actors at once). A group is judged as soon as its replies are sampled. Groups are trained on in
the dataset's order: each training step (iteration) takes exactly `groups_per_batch` groups that are fresh
enough, i.e. sampled by a policy at most `max_steps_off_policy` optimizer steps old; an older one is sampled
again (with the current policy) and keeps its place. Samplers run up to max(max_steps_off_policy, 1)
iterations ahead of the trainer (streaming alone: none). Streaming splits each iteration's groups into
`num_minibatches` minibatches and trains on each (one forward_backward and one optimizer step) as soon as its
groups are judged. Metrics `sampling_client/step_{max,min,mean}` and `time/sampling_time_{max,min,mean}` (spec
5.8) plus `sampling_client/staleness_{max,mean}`; each trained group's sampler step is in the iteration's
train_rollout_summaries.jsonl (`sampling_client_step`).

Every mode writes timeline.jsonl and timeline.png (rl/timeline.py): when sampling, judging, training,
evaluation and checkpointing ran, per iteration. Checkpoints are saved every `save_every` iterations and at the
end; a killed run resumes from its last checkpoint, optimizer included (the pipelined loops also record the
dataset position reached, `next_group`; groups that were in flight are sampled again).

Deviations from the reference: the pipelined loops consume groups in dataset order (not in completion order),
so that with max_steps_off_policy=0 the asynchronous loop trains on exactly the synchronous loop's groups (its
samplers still run one iteration ahead, as the reference's do, and what they sample then is sampled again);
rollout seeds follow a group's dataset position, not the iteration that trained on it; with
remove_constant_reward_groups a constant group is dropped as soon as it is judged and the batch waits for the
next one (as the reference's asynchronous loop does; the synchronous loop keeps one if all are constant). Streaming makes one
optimizer step per minibatch (the reference: one per substep), so num_substeps must be 1 with it. An
evaluation runs concurrently with training (the reference's separate evaluation loop) and its metrics go into
the record of the iteration whose weights it evaluated; streaming also evaluates before the last iteration, as
the reference does.
"""

from __future__ import annotations

import dataclasses

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
from tqdm import tqdm

from rlhfkit.checkpoint_manager import CheckpointManager
from rlhfkit.compat import compat_setting, warn_ignored_fields
from rlhfkit.completers import TinkerTokenCompleter
from rlhfkit.config import ConfigError, at_least, between, positive, setting, validate
from rlhfkit.engine import ServiceClient
from rlhfkit.engine.settings import EngineSettings, resolve, with_engine
from rlhfkit.engine.types import AdamParams, Datum
from rlhfkit.evaluators import EvaluatorBuilder, SamplingClientEvaluator
from rlhfkit.model_info import warn_if_renderer_not_recommended
from rlhfkit.rl import data_processing, metrics as rl_metrics
from rlhfkit.rl.rollout_logging import iteration_dir, rollout_summary_records, write_rollout_summaries, write_train_html
from rlhfkit.rl.rollouts import sample_group, score_group
from rlhfkit.rl.timeline import DISCARDED, Timeline, write_timeline_plot
from rlhfkit.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder, TrajectoryGroup
from rlhfkit.run_files import FINAL_CHECKPOINT, INIT_SAMPLER_DIR, ROLLOUT_SUMMARIES_FILE, TRAIN_HTML_FILE
from rlhfkit.utils import ml_log
from rlhfkit.utils.async_utils import run_or_await
from rlhfkit.utils.timing import Timer
from rlhfkit.utils.nonfinite import NonFiniteGuard, describe_rows
from rlhfkit.utils.run_lock import RunLock
from rlhfkit.engine.clients import SamplingClient, TrainingClient

logger = logging.getLogger(__name__)

PLOT_PANELS = [  # metrics.png: one panel per list
    ["env/all/reward/total", "env/all/win_minus_loss"],
    ["test/win_rate", "test/win_rate_symmetric"],
    ["kl/policy_vs_init", "optim/kl_sample_train_v1"],
    ["env/all/ac_tokens_per_turn"],
    ["env/all/frac_truncated", "env/all/format"],
    ["time/sample", "time/judge", "time/train", "time/wait_for_groups"],
    ["sampling_client/staleness_max", "sampling_client/staleness_mean"],
]


@dataclass(frozen=True)
class KLReferenceConfig:
    """The reference model of the KL penalty: a base model, optionally with a saved state's weights."""

    base_model: str
    load_checkpoint_path: str | None = None


@dataclass(frozen=True)
class AsyncConfig:
    """Asynchronous off-policy RL (spec 5.8): samplers and the trainer run concurrently."""

    max_steps_off_policy: int = setting(
        help="a group sampled by a policy more than this many optimizer steps older than the one being trained "
        "is sampled again",
        check=at_least(0),
    )
    groups_per_batch: int = setting(help="groups (prompts) per training step", check=at_least(1))

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class StreamMinibatchConfig:
    """Streaming (spec 5.8): an iteration's groups in `num_minibatches` minibatches, each trained on (one
    optimizer step) as soon as its groups are judged."""

    groups_per_batch: int = setting(help="groups (prompts) per iteration, over all its minibatches", check=at_least(1))
    num_minibatches: int = setting(help="minibatches (optimizer steps) per iteration", check=at_least(1))

    def __post_init__(self) -> None:
        validate(self)
        if self.num_minibatches > self.groups_per_batch:
            raise ConfigError(
                "num_minibatches", self.num_minibatches, f"at most groups_per_batch ({self.groups_per_batch})"
            )


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
    engine: EngineSettings | None = setting(
        None,
        "where the engine runs (rlhfkit.engine.EngineSettings; None: the RLHFKIT_* environment); "
        "the backend/ray_address/num_* fields below override it",
    )
    backend: Literal["local", "ray"] | None = setting(None, "engine backend: 'local' or 'ray' (None: $RLHFKIT_BACKEND)")
    ray_address: str | None = setting(None, "backend=ray: None starts a local Ray instance; 'auto' joins a cluster")
    num_train_workers: int | None = setting(
        None, "backend=ray: data-parallel training workers (None: one per GPU, else 1)", check=at_least(1)
    )
    num_samplers: int | None = setting(None, "backend=ray: inference-engine actors (None: 1)", check=at_least(1))
    async_config: AsyncConfig | None = setting(
        None, "sample and train concurrently, up to max_steps_off_policy steps off policy (None: synchronous)"
    )
    stream_minibatch_config: StreamMinibatchConfig | None = setting(
        None, "train on minibatches of each iteration as soon as their groups are judged (None: off)"
    )
    ttl_seconds: int | None = compat_setting("ttl_seconds", 604800)

    def __post_init__(self) -> None:
        validate(self)
        warn_ignored_fields(self)
        if self.kl_penalty_coef > 0 and self.kl_reference_config is None:
            raise ConfigError(
                "kl_reference_config", None, "kl_penalty_coef > 0 needs KLReferenceConfig(base_model=...)"
            )
        stream, asynchronous = self.stream_minibatch_config, self.async_config
        if stream is not None and self.num_substeps != 1:
            raise ConfigError(
                "num_substeps", self.num_substeps, "streaming makes one optimizer step per minibatch: use 1"
            )
        if stream is not None and asynchronous is not None and stream.groups_per_batch != asynchronous.groups_per_batch:
            raise ConfigError(
                "stream_minibatch_config",
                stream.groups_per_batch,
                f"groups_per_batch must equal async_config's ({asynchronous.groups_per_batch})",
            )

    @property
    def pipelined(self) -> bool:
        """Whether the asynchronous/streaming loop runs (else the synchronous one)."""
        return self.async_config is not None or self.stream_minibatch_config is not None


class SamplerMismatchError(RuntimeError):
    """The sampler's logprobs of its own tokens differ from the trainer's: its weights are not the policy's."""


def _rollout_seed(seed: int | None, iteration: int, group_idx: int, env_idx: int) -> int | None:
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, iteration, group_idx, env_idx]).generate_state(1)[0])


def _init_sampling_client(
    config: Config, service: ServiceClient, training_client: TrainingClient, log_path: str, resumed: bool
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


async def _evaluate(
    evaluators: Sequence[Any], sampling_client: SamplingClient, training_client: TrainingClient
) -> dict[str, float]:
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


def sampler_name(sampling_client: SamplingClient) -> str:
    """How the error names a sampler: its adapter (id and checkpoint folder) where it has one."""
    parts = [
        f"{k}={getattr(sampling_client, k)}"
        for k in ("adapter_id", "adapter_path")
        if getattr(sampling_client, k, None) is not None
    ]
    return ", ".join(parts) if parts else f"{type(sampling_client).__name__} on the policy's current weights"


async def _train_step(
    config: Config,
    training_client: TrainingClient,
    data: list[Datum],
    sampler: str,
    on_policy: Sequence[bool] | None = None,
    num_substeps: int | None = None,
) -> tuple[dict[str, float], list[Any]]:
    """`num_substeps` (default config.num_substeps) equal splits of the batch, each one forward_backward and one
    Adam step; returns the metrics and the trainer's (pre-update) logprobs of each datum. Before the first step,
    the trainer's logprobs of the sampled tokens are checked against the sampler's over the datums marked
    `on_policy` (default all; sampled by the weights being trained, so the two must agree): a sampler that runs
    other weights stops the run (`_check_sampler`)."""
    batch = [data_processing.remove_mask(d) for d in data]
    substeps = config.num_substeps if num_substeps is None else num_substeps
    splits = [s for s in np.array_split(np.arange(len(batch)), substeps) if len(s)]
    adam = AdamParams(learning_rate=config.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
    train_logprobs: list[Any] = [None] * len(batch)
    metrics: dict[str, float] = {"optim/loss:sum": 0.0, "optim/skipped_nonfinite": 0.0}
    for substep, indices in enumerate(splits):
        output = await training_client.forward_backward(
            [batch[j] for j in indices], config.loss_fn, config.loss_fn_config
        )
        for j, out in zip(indices, output.loss_fn_outputs):
            train_logprobs[j] = out["logprobs"]
        metrics["optim/loss:sum"] += output.metrics.get("loss:sum", 0.0)
        checked = [j for j in indices if on_policy is None or on_policy[j]]
        if substep == 0 and checked:  # on-policy: the trainer's logprobs must equal the sampler's (ratio 1)
            diff = np.concatenate(
                [
                    rl_metrics.action_values(data[j], "logprobs")
                    - train_logprobs[j].to_numpy()[data[j].loss_fn_inputs["mask"].to_numpy() > 0]
                    for j in checked
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
        step = await training_client.optim_step(adam)
        skipped = metrics["optim/skipped_nonfinite"] + (step.metrics or {}).get("optim/skipped_nonfinite", 0.0)
        metrics.update({**(step.metrics or {}), "optim/skipped_nonfinite": skipped})
    return metrics, train_logprobs


@dataclass
class _Run:
    """What an RL run holds from start to end (built once by `_start_run`)."""

    config: Config
    log_path: str
    training_client: TrainingClient
    dataset: RLDataset
    evaluators: list
    init_client: SamplingClient | None  # the starting weights, for kl/policy_vs_init (None: off)
    kl_reference_client: SamplingClient | None  # the KL penalty's reference (None: no penalty)
    tokenizer: Any
    checkpoints: CheckpointManager
    ml_logger: Any
    timeline: Timeline
    nonfinite: NonFiniteGuard
    start_batch: int
    end_batch: int
    resume: Any  # the checkpoint record resumed from, or None

    def policy_for(
        self, sampling_client: SamplingClient, position: tuple[int, int]
    ) -> Callable[[int], TinkerTokenCompleter]:
        """The completer of env k of the group at dataset `position` (batch, index): seeded by that position."""
        batch, group = position
        return lambda env_idx: TinkerTokenCompleter(
            sampling_client,
            self.config.max_tokens,
            self.config.temperature,
            seed=_rollout_seed(self.config.seed, batch, group, env_idx),
        )

    def eval_due(self, step: int) -> bool:
        """Evaluate the weights after `step` updates (before iteration `step` trains)?"""
        if not self.evaluators or self.config.eval_every <= 0 or step >= self.end_batch:
            return False
        last = self.config.stream_minibatch_config is not None and step == self.end_batch - 1
        return step % self.config.eval_every == 0 or last

    def log_rollouts(
        self,
        iteration: int,
        groups: list[TrajectoryGroup],
        builders: Sequence[EnvGroupBuilder],
        advantages: list[np.ndarray],
        sampler_steps: Sequence[int],
    ) -> None:
        folder = iteration_dir(self.log_path, iteration)
        n = min(self.config.num_groups_to_log, len(groups))
        if n > 0:
            write_train_html(
                folder / TRAIN_HTML_FILE, iteration, groups[:n], builders[:n], advantages[:n], self.tokenizer
            )
        if self.config.rollout_json_export:
            write_rollout_summaries(
                folder / ROLLOUT_SUMMARIES_FILE,
                rollout_summary_records(groups, builders, iteration, sampling_client_step=list(sampler_steps)),
            )

    async def train_on(
        self,
        step: int,
        groups: list[TrajectoryGroup],
        advantages: list[np.ndarray],
        sampler: str,
        timer: Timer,
        on_policy_groups: Sequence[bool] | None = None,
        first: bool = True,
        num_substeps: int | None = None,
    ) -> tuple[dict[str, float], list[Datum], list[Any]]:
        """Datums of the groups (KL penalty included), kl/policy_vs_init (on the `first` training call of the
        iteration), one training step; returns (metrics, datums, the trainer's logprobs of each datum)."""
        config = self.config
        with self.timeline.span("reference", step):  # the KL penalty's and kl/policy_vs_init's logprobs
            data, metadata, metrics = await data_processing.prepare_training_data(
                groups, advantages, self.kl_reference_client, config.kl_penalty_coef, config.kl_discount_factor
            )
            if not data:
                logger.warning("iteration %d: no training data (every reply is empty); skipping the update", step)
                return metrics, [], []
            if self.init_client is not None and first:  # reward-hacking watch: how far the policy has drifted
                metrics["kl/policy_vs_init"] = await rl_metrics.compute_kl_policy_vs_reference(
                    data[: config.policy_kl_num_sequences], self.init_client
                )
        on_policy = None if on_policy_groups is None else [on_policy_groups[m["group_idx"]] for m in metadata]
        with self.timeline.span("train", step, timer):
            train_metrics, logprobs = await _train_step(
                config, self.training_client, data, sampler, on_policy, num_substeps
            )
        metrics.update(train_metrics)
        self.nonfinite.check(step, metrics["optim/loss:sum"], metrics, lambda: describe_rows(data, self.tokenizer))
        return metrics, data, logprobs

    def save(self, step: int, loop_state: dict[str, Any]) -> None:
        """Checkpoint of the state before iteration `step` ("final" when it is the end)."""
        name = FINAL_CHECKPOINT if step >= self.end_batch else f"{step:06d}"
        self.checkpoints.save(self.training_client, name, {"batch": step, **loop_state})


def _progress(run: _Run) -> tqdm:
    return tqdm(
        total=run.end_batch,
        initial=run.start_batch,
        desc=run.config.recipe_name,
        unit="it",
        dynamic_ncols=True,
    )


def _show(progress: tqdm, metrics: dict[str, float]) -> None:
    progress.update(1)
    progress.set_postfix(
        reward=f"{metrics.get('env/all/reward/total', float('nan')):+.3f}",
        ac_tokens=f"{metrics.get('env/all/ac_tokens_per_turn', float('nan')):.0f}",
        kl_init=f"{metrics.get('kl/policy_vs_init', float('nan')):.4f}",
    )


# --------------------------------------------------------------------------------------------------
# The synchronous loop (spec 5.9)


async def _run_iteration(run: _Run, i: int, sampling_client: SamplingClient, timer: Timer) -> dict[str, float]:
    """One RL iteration on the current weights; returns its metrics (the weights are updated in place)."""
    config = run.config
    metrics: dict[str, float] = {"progress/batch": i, "optim/lr": config.learning_rate}
    if run.eval_due(i):
        with run.timeline.span("eval", i, timer):
            metrics.update(await _evaluate(run.evaluators, sampling_client, run.training_client))

    # Rollouts: every env of every group at once, so the engine samples them in one generation batch.
    builders = list(run.dataset.get_batch(i))
    with run.timeline.span("sample", i, timer):
        sampled = await asyncio.gather(
            *(sample_group(b, run.policy_for(sampling_client, (i, g))) for g, b in enumerate(builders))
        )
    # Rewards: every group's judging at once; the judge's batcher serves them in one scoring call.
    with run.timeline.span("judge", i, timer):
        groups = list(
            await asyncio.gather(
                *(score_group(b, envs, trajectories) for b, (envs, trajectories) in zip(builders, sampled, strict=True))
            )
        )
        await asyncio.gather(*(b.cleanup() for b in builders))

    metrics.update(rl_metrics.compute_trajectory_metrics(groups, builders))
    advantages = data_processing.compute_advantages(groups)
    run.log_rollouts(i, groups, builders, advantages, [i] * len(groups))
    if config.remove_constant_reward_groups:
        keep = data_processing.groups_to_keep(groups)
        groups, advantages = [groups[k] for k in keep], [advantages[k] for k in keep]
    train_metrics, data, logprobs = await run.train_on(i, groups, advantages, sampler_name(sampling_client), timer)
    metrics.update(train_metrics)
    if data:
        metrics.update(rl_metrics.compute_kl_sample_train(data, logprobs))
    return metrics


async def _sync_loop(run: _Run) -> None:
    sampling_client = run.training_client.save_weights_and_get_sampling_client()
    progress = _progress(run)
    for i in range(run.start_batch, run.end_batch):
        timer = Timer()
        metrics = await _run_iteration(run, i, sampling_client, timer)
        with run.timeline.span("sync_weights", i, timer):
            sampling_client = run.training_client.save_weights_and_get_sampling_client()  # the updated weights
        metrics["progress/done_frac"] = (i + 1) / run.end_batch
        metrics.update(timer.total())
        # Log first, then checkpoint: a kill in between re-runs this iteration and its record is replaced.
        run.ml_logger.log_metrics(metrics, step=i)
        _show(progress, metrics)
        # Periodic checkpoint of the state before iteration i + 1 (skipped when it would be the final one).
        if i + 1 < run.end_batch and run.checkpoints.due(i + 1):
            with run.timeline.span("checkpoint", i):
                run.save(i + 1, {})
    progress.close()
    run.save(run.end_batch, {})


# --------------------------------------------------------------------------------------------------
# The asynchronous and streaming loop (spec 5.8)


@dataclass
class _JudgedGroup:
    """A group sampled and judged: where it is in the dataset, which policy version sampled it, and when."""

    position: tuple[int, int]  # (dataset batch, index in that batch)
    builder: EnvGroupBuilder
    group: TrajectoryGroup
    advantages: np.ndarray
    sampler_step: int  # optimizer steps the sampler's weights had seen
    seconds: float  # sampling plus judging
    spans: list[tuple[str, float, float]]  # (kind, start, end) for the timeline


def _group_stream(dataset: RLDataset, start: tuple[int, int]) -> Iterator[tuple[tuple[int, int], EnvGroupBuilder]]:
    """The dataset's groups in order from position `start` (batch, index in batch)."""
    for b in range(start[0], len(dataset)):
        for g, builder in enumerate(dataset.get_batch(b)):
            if b > start[0] or g >= start[1]:
                yield (b, g), builder


@dataclass
class _Pipeline:
    """Samplers, judges, the trainer and evaluations as concurrent tasks (see the module docstring)."""

    run: _Run
    max_off_policy: int = field(init=False)
    lookahead: int = field(init=False)  # iterations the samplers may run ahead of the trainer
    groups_per_batch: int = field(init=False)
    num_minibatches: int = field(init=False)

    def __post_init__(self) -> None:
        asynchronous, stream = self.run.config.async_config, self.run.config.stream_minibatch_config
        self.max_off_policy = 0 if asynchronous is None else asynchronous.max_steps_off_policy
        self.lookahead = 0 if asynchronous is None else max(asynchronous.max_steps_off_policy, 1)
        self.groups_per_batch = (asynchronous or stream).groups_per_batch  # type: ignore[union-attr]
        self.num_minibatches = 1 if stream is None else stream.num_minibatches
        resume = self.run.resume
        start = resume.get("next_group") if resume is not None else None
        self.next_position: tuple[int, int] = tuple(start) if start else (self.run.start_batch, 0)  # type: ignore
        self.stream = _group_stream(self.run.dataset, self.next_position)
        self.exhausted = False
        self.order: collections.deque[tuple[int, int]] = collections.deque()  # released, not yet consumed
        self.builders: dict[tuple[int, int], EnvGroupBuilder] = {}
        self.tasks: dict[tuple[int, int], asyncio.Task] = {}
        self.started_step: dict[tuple[int, int], int] = {}
        self.sampled: set[tuple[int, int]] = set()  # released groups whose replies are sampled
        self.step = self.run.start_batch  # the iteration being trained
        self.consumed_in_step = 0
        self.counts = {"resampled": 0, "dropped_constant": 0}
        self.sampling_client: SamplingClient | None = None
        self.sampler_step = self.run.start_batch
        self.evals: dict[int, asyncio.Task] = {}
        self.pending: collections.deque[tuple[int, dict[str, float]]] = collections.deque()  # records to log

    # Sampling and judging
    async def _sample_and_judge(
        self, position: tuple[int, int], builder: EnvGroupBuilder, client: SamplingClient, client_step: int
    ) -> _JudgedGroup:
        spans: list[tuple[str, float, float]] = []
        start = time.time()
        try:
            envs, trajectories = await sample_group(builder, self.run.policy_for(client, position))
            spans.append(("sample", start, time.time()))
            self.sampled.add(position)
            self._release()  # the next iteration's groups may start once this one's are sampled
            group = await score_group(builder, envs, trajectories)  # judged as soon as its replies are in
            spans.append(("judge", spans[-1][2], time.time()))
            await builder.cleanup()
        except asyncio.CancelledError:  # sampled again with newer weights: this work is thrown away
            spans.append(("judge" if spans else "sample", spans[-1][2] if spans else start, time.time()))
            self._record_spans(spans, DISCARDED, position, client_step)
            raise
        advantages = data_processing.compute_advantages([group])[0]
        return _JudgedGroup(position, builder, group, advantages, client_step, time.time() - start, spans)

    def _record_spans(self, spans: list, step: int, position: tuple[int, int], sampler_step: int) -> None:
        for kind, start, end in spans:
            self.run.timeline.add(kind, step, start, end, group=list(position), sampler_step=sampler_step)

    def _start(self, position: tuple[int, int]) -> None:
        """Sample (again) and judge the group at `position` with the current policy."""
        old = self.tasks.get(position)
        if old is not None and not old.done():
            old.cancel()
        self.started_step[position] = self.sampler_step
        self.sampled.discard(position)
        self.tasks[position] = asyncio.create_task(
            self._sample_and_judge(position, self.builders[position], self.sampling_client, self.sampler_step)
        )

    def _release(self) -> None:
        """Start groups in dataset order while they are needed and within the samplers' lead. A later
        iteration's groups start only once the current iteration's groups are all sampled, so these are sampled
        together, in one batch as in the synchronous loop (the same batch composition, so the same numbers)."""
        window = self.groups_per_batch * (1 + self.lookahead)
        needed = (self.run.end_batch - self.step) * self.groups_per_batch - self.consumed_in_step
        current = self.groups_per_batch - self.consumed_in_step  # groups still due in this iteration
        while not self.exhausted and len(self.order) + self.consumed_in_step < window and len(self.order) < needed:
            if len(self.order) >= current and not all(p in self.sampled for p in list(self.order)[:current]):
                break
            try:
                position, builder = next(self.stream)
            except StopIteration:
                self.exhausted = True
                break
            self.order.append(position)
            self.builders[position] = builder
            self._start(position)

    def _resample_stale(self) -> None:
        """At the start of an iteration: every released group whose sampler is too old for it is sampled
        again now (done or still running), all at once."""
        for position in self.order:
            if self.step - self.started_step[position] <= self.max_off_policy:
                continue
            task = self.tasks[position]
            if task.done():
                judged = task.result()  # raises the group's error, if it failed
                self._record_spans(judged.spans, DISCARDED, position, judged.sampler_step)
            self.counts["resampled"] += 1
            self._start(position)

    async def _next_group(self) -> _JudgedGroup | None:
        """The next fresh-enough group in dataset order (None once the data is exhausted)."""
        while True:
            if not self.order:
                self._release()
                if not self.order:
                    return None
            position = self.order[0]
            judged = await self.tasks[position]
            if self.step - judged.sampler_step > self.max_off_policy:  # stale: sample it again
                self._record_spans(judged.spans, DISCARDED, position, judged.sampler_step)
                self.counts["resampled"] += 1
                self._start(position)
                continue
            self.order.popleft()
            for table in (self.tasks, self.builders, self.started_step):
                del table[position]
            self.sampled.discard(position)
            self.next_position = (position[0], position[1] + 1)
            if self.run.config.remove_constant_reward_groups and data_processing.is_constant_reward_group(judged.group):
                self._record_spans(judged.spans, DISCARDED, position, judged.sampler_step)
                self.counts["dropped_constant"] += 1
                self._release()
                continue
            self.consumed_in_step += 1
            self._release()
            self._record_spans(judged.spans, self.step, position, judged.sampler_step)
            return judged

    def _resume_position(self) -> list[int]:
        """Where a resumed run starts reading the dataset: the group after the last one trained on (or dropped);
        in-flight groups are not recorded, so a resumed run samples them again."""
        batch, group = self.next_position
        while batch < len(self.run.dataset) and group >= len(self.run.dataset.get_batch(batch)):
            batch, group = batch + 1, 0
        return [batch, group]

    # Evaluation and logging
    def _start_eval(self) -> None:
        if self.run.eval_due(self.sampler_step):
            step, client = self.sampler_step, self.sampling_client

            async def evaluate() -> dict[str, float]:
                with self.run.timeline.span("eval", step):
                    return await _evaluate(self.run.evaluators, client, self.run.training_client)

            self.evals[step] = asyncio.create_task(evaluate())

    async def _flush(self, wait: bool) -> None:
        """Log the finished iterations' records in order (each after its evaluation, if any; `wait`: all)."""
        while self.pending:
            step, metrics = self.pending[0]
            evaluation = self.evals.get(step)
            if evaluation is not None:
                if not (wait or evaluation.done()):
                    return
                metrics.update(await evaluation)
                del self.evals[step]
            self.pending.popleft()
            # in a thread: the metrics plot must not hold up the samplers' event loop
            await asyncio.to_thread(self.run.ml_logger.log_metrics, metrics, step)

    async def _new_sampler(self, timer: Timer | None = None) -> None:
        with self.run.timeline.span("sync_weights", self.step, timer):
            self.sampling_client = await asyncio.to_thread(
                self.run.training_client.save_weights_and_get_sampling_client
            )

    # The trainer
    async def _iteration(self, timer: Timer) -> tuple[dict[str, float], bool]:
        """Train iteration self.step on its groups, minibatch by minibatch as they arrive; (metrics, whether all
        its groups were there)."""
        run, step = self.run, self.step
        metrics: dict[str, float] = {"progress/batch": step, "optim/lr": run.config.learning_rate}
        sizes = [len(s) for s in np.array_split(np.arange(self.groups_per_batch), self.num_minibatches)]
        judged: list[_JudgedGroup] = []
        data: list[Datum] = []
        logprobs: list[Any] = []
        complete = True
        optimizer_steps = 0
        for minibatch, size in enumerate(sizes):
            batch: list[_JudgedGroup] = []
            with timer.span("wait_for_groups"):
                while len(batch) < size and (group := await self._next_group()) is not None:
                    batch.append(group)
            if len(batch) < size:
                complete = False
                if not batch:
                    break
            judged += batch
            train_metrics, batch_data, batch_logprobs = await run.train_on(
                step,
                [j.group for j in batch],
                [j.advantages for j in batch],
                sampler_name(self.sampling_client),
                timer,
                on_policy_groups=[minibatch == 0 and j.sampler_step == step for j in batch],
                first=minibatch == 0,
                num_substeps=None if self.num_minibatches == 1 else 1,
            )
            data += batch_data
            logprobs += batch_logprobs
            substeps = run.config.num_substeps if self.num_minibatches == 1 else 1
            optimizer_steps += min(substeps, len(batch_data))
            for key, value in train_metrics.items():  # sums over minibatches; the others: first or last value
                if key in ("optim/loss:sum", "optim/skipped_nonfinite") and key in metrics:
                    metrics[key] += value
                elif key.startswith(("kl/", "optim/first_substep_")):
                    metrics.setdefault(key, value)
                else:
                    metrics[key] = value
            if not complete:
                break
        if judged:
            groups, builders = [j.group for j in judged], [j.builder for j in judged]
            metrics.update(rl_metrics.compute_trajectory_metrics(groups, builders))
            metrics.update(
                rl_metrics.compute_sampling_client_metrics(
                    step, [j.sampler_step for j in judged], [j.seconds for j in judged]
                )
            )
            run.log_rollouts(step, groups, builders, [j.advantages for j in judged], [j.sampler_step for j in judged])
        if data:
            metrics.update(rl_metrics.compute_kl_sample_train(data, logprobs))
        metrics["optim/steps"] = float(optimizer_steps)
        return metrics, complete

    async def run_loop(self) -> None:
        run = self.run
        progress = _progress(run)
        await self._new_sampler()
        self._start_eval()
        self._release()
        try:
            while self.step < run.end_batch:
                timer = Timer()
                resampled, dropped = self.counts["resampled"], self.counts["dropped_constant"]
                metrics, complete = await self._iteration(timer)
                if "env/all/reward/total" not in metrics:  # nothing left to train on
                    logger.warning("the data ran out after %d iterations", self.step)
                    break
                await self._new_sampler(timer)
                self.step += 1
                self.sampler_step = self.step
                self.consumed_in_step = 0
                self._resample_stale()  # before any new group starts, so they are sampled in one batch
                self._start_eval()
                self._release()
                metrics["async/resampled_groups"] = self.counts["resampled"] - resampled
                metrics["async/dropped_groups"] = self.counts["dropped_constant"] - dropped
                metrics["progress/done_frac"] = self.step / run.end_batch
                metrics.update(timer.total())
                self.pending.append((self.step - 1, metrics))
                await self._flush(wait=False)
                _show(progress, metrics)
                if not complete:
                    logger.warning("the data ran out during iteration %d", self.step - 1)
                    break
                if self.step < run.end_batch and run.checkpoints.due(self.step):
                    await self._flush(wait=True)  # a record is logged before the checkpoint that covers it
                    with run.timeline.span("checkpoint", self.step - 1):
                        await asyncio.to_thread(run.save, self.step, {"next_group": self._resume_position()})
            await self._flush(wait=True)
        finally:
            progress.close()
            for task in [*self.tasks.values(), *self.evals.values()]:  # in-flight groups are dropped
                task.cancel()
            await asyncio.gather(*self.tasks.values(), *self.evals.values(), return_exceptions=True)
        final = run.end_batch if self.step >= run.end_batch else self.step
        run.end_batch = final
        run.save(final, {"next_group": self._resume_position()})


# --------------------------------------------------------------------------------------------------
# Start


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
            config=recorded_config(config),
            start_step=start_batch,
            plot_panels=PLOT_PANELS,
        )
        try:
            run = await _start_run(config, log_path, checkpoints, start_batch, ml_logger)
            if run is not None:
                await (_Pipeline(run).run_loop() if config.pipelined else _sync_loop(run))
        finally:
            ml_logger.close()
            write_timeline_plot(log_path, title=f"{config.recipe_name}: {_mode_name(config)}")


def _mode_name(config: Config) -> str:
    parts = []
    if config.async_config is not None:
        parts.append(f"asynchronous, max_steps_off_policy={config.async_config.max_steps_off_policy}")
    if config.stream_minibatch_config is not None:
        parts.append(f"streaming, {config.stream_minibatch_config.num_minibatches} minibatches")
    return "; ".join(parts) or "synchronous"


async def _start_run(
    config: Config, log_path: str, checkpoints: CheckpointManager, start_batch: int, ml_logger: Any
) -> _Run | None:
    """The clients, dataset and evaluators of the run (None when it was already complete)."""
    warn_if_renderer_not_recommended(config.model_name, config.renderer_name)
    if config.seed is not None:
        random.seed(config.seed + start_batch)  # the engine's fallback sampling seeds (evaluators)
    service = ServiceClient(base_url=config.base_url, settings=engine_settings(config))
    training_client, resume = checkpoints.training_client(
        service, config.model_name, config.lora_rank, config.load_checkpoint_path, seed=config.seed
    )
    if resume is not None:
        logger.info("Resuming at iteration %d from %s", resume.batch, resume.state_path)
    init_client = _init_sampling_client(config, service, training_client, log_path, resumed=resume is not None)
    kl_reference_client = _kl_reference_client(config, service)
    tokenizer = training_client.get_tokenizer()
    # the judge and the evaluators run where this loop runs, unless their builders name an engine of their own
    dataset, _ = await with_engine(config.dataset_builder, service.settings)()
    evaluators = [with_engine(build, service.settings)() for build in config.evaluator_builders]
    end_batch = len(dataset) if config.max_steps is None else min(config.max_steps, len(dataset))
    if start_batch >= end_batch:
        logger.info("Training was already complete (%d of %d iterations done)", start_batch, end_batch)
        return None
    return _Run(
        config=config,
        log_path=log_path,
        training_client=training_client,
        dataset=dataset,
        evaluators=evaluators,
        init_client=init_client,
        kl_reference_client=kl_reference_client,
        tokenizer=tokenizer,
        checkpoints=checkpoints,
        ml_logger=ml_logger,
        timeline=Timeline(log_path, start_batch),
        nonfinite=NonFiniteGuard(config.max_nonfinite_in_a_row, log_path),
        start_batch=start_batch,
        end_batch=end_batch,
        resume=resume,
    )


def recorded_config(config: Config) -> Config:
    """The config as config.json records it: with the engine this loop runs on, and in the judge's and the
    evaluators' builders the engine each of them runs on."""
    engine = engine_settings(config)
    return dataclasses.replace(
        config,
        engine=engine,
        dataset_builder=with_engine(config.dataset_builder, engine),
        evaluator_builders=[with_engine(build, engine) for build in config.evaluator_builders],
    )


def engine_settings(config: Config) -> EngineSettings:
    """Where this loop's clients (trainer, samplers, judge, KL reference, evaluators) run: `config.engine` with
    the flat fields on top."""
    return resolve(
        config.engine,
        sampler=config.sampler,
        backend=config.backend,
        ray_address=config.ray_address,
        num_train_workers=config.num_train_workers,
        num_samplers=config.num_samplers,
    )


def main(config: Config) -> Any:
    """Run RL. Outside an event loop this runs to completion; inside one it returns a coroutine to await."""
    return run_or_await(main_async(config))
