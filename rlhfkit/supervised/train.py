"""Supervised fine-tuning loop (spec 3.2-3.4): the SFT stage, and the preference-model stage.

    from rlhfkit.supervised import train
    train.main(config)          # in a plain script: runs to completion (asyncio.run inside)
    await train.main(config)    # inside a running event loop (notebook, async code): returns a coroutine

Per step: lr from the schedule; periodic checkpoint of the state *before* this step's update (recorded with
batch = this step, so a resume is exact); evaluation on the pre-update weights every `eval_every` steps;
cross-entropy forward_backward on the batch (a sum over tokens of per-datum weights), one Adam step; one
metrics.jsonl record. A killed run resumes from its last checkpoint with the optimizer state.
"""

from __future__ import annotations

import dataclasses

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from rlhfkit.checkpoint_manager import CheckpointManager
from rlhfkit.compat import compat_setting, warn_ignored_fields
from rlhfkit.config import at_least, between, positive, setting, validate
from rlhfkit.engine import ServiceClient
from rlhfkit.engine.settings import EngineSettings, resolve
from rlhfkit.engine.types import AdamParams
from rlhfkit.evaluators import EvaluatorBuilder
from rlhfkit.model_info import warn_if_renderer_not_recommended
from rlhfkit.run_files import CHECKPOINTS_DIR, FINAL_CHECKPOINT
from rlhfkit.supervised.common import compute_bpb, compute_mean_nll
from rlhfkit.supervised.loop import describe_datum, run_evaluators
from rlhfkit.supervised.nll_evaluator import NLLEvaluator
from rlhfkit.supervised.types import SupervisedDatasetBuilder
from rlhfkit.utils import ml_log
from rlhfkit.utils.async_utils import run_or_await
from rlhfkit.utils.lr_scheduling import compute_schedule_lr_multiplier
from rlhfkit.utils.timing import Timer
from rlhfkit.utils.nonfinite import NonFiniteGuard, describe_rows
from rlhfkit.utils.run_lock import RunLock

logger = logging.getLogger(__name__)


@dataclass
class Config:
    """The supervised loop's settings (the SFT and preference-model stages)."""

    log_path: str = setting(help="run folder: metrics.jsonl, checkpoints, logs")
    model_name: str = setting(help="base model (see rlhfkit pipeline --help, base_model)")
    recipe_name: str = setting(help="name shown on the progress bar and in the logs")
    dataset_builder: SupervisedDatasetBuilder = setting(help="frozen-dataclass builder of (train, test) datasets")
    load_checkpoint_path: str | None = setting(None, "start from these weights (fresh optimizer); None: a new LoRA")
    renderer_name: str | None = setting(None, "metadata only (the dataset builder renders); warns if unusual")
    learning_rate: float = setting(1e-4, "peak learning rate", check=positive)
    lr_schedule: Literal["linear", "cosine", "constant"] = setting("linear", "learning-rate schedule over the steps")
    num_epochs: int = setting(1, "passes over the training data", check=at_least(1))
    lora_rank: int = setting(32, "LoRA rank", check=at_least(1))
    evaluator_builders: list[EvaluatorBuilder] = setting(
        help="evaluators run every eval_every steps", default_factory=list
    )
    infrequent_evaluator_builders: list[EvaluatorBuilder] = setting(
        help="evaluators run every infrequent_eval_every steps", default_factory=list
    )
    save_every: int = setting(20, "checkpoint every this many steps (0: only the final one)", check=at_least(0))
    save_every_tokens: int = setting(
        0, "also checkpoint once this many tokens were trained since the last save (0: off)", check=at_least(0)
    )
    save_every_seconds: float = setting(
        0.0, "also checkpoint once this much wall time passed since the last save (0: off)", check=at_least(0)
    )
    eval_every: int = setting(10, "evaluate every this many steps (0: off)", check=at_least(0))
    infrequent_eval_every: int = setting(
        100, "run the infrequent evaluators every this many steps (0: off)", check=at_least(0)
    )
    adam_beta1: float = setting(0.9, "Adam beta1", check=between(0, 1))
    adam_beta2: float = setting(0.95, "Adam beta2", check=between(0, 1))
    adam_eps: float = setting(1e-8, "Adam epsilon", check=positive)
    wandb_project: str | None = setting(None, "Weights & Biases project (None: off)")
    wandb_name: str | None = setting(None, "Weights & Biases run name")
    max_steps: int | None = setting(
        None, "stop after this many steps (None: num_epochs of the data)", check=at_least(0)
    )
    base_url: str | None = setting(None, "the service address; only None (the local engine) is supported")
    ttl_seconds: int | None = compat_setting("ttl_seconds", 604800)
    rolling_save_every: int = compat_setting("rolling_save_every", 0)
    rolling_ttl_seconds: int = compat_setting("rolling_ttl_seconds", 7200)
    async_periodic_saves: bool = compat_setting("async_periodic_saves", False)
    enable_trace: bool = compat_setting("enable_trace", False)
    span_chart_every: int = compat_setting("span_chart_every", 0)
    submit_ahead: int = compat_setting("submit_ahead", 1)
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
    max_nonfinite_in_a_row: int = setting(
        3,
        "stop after this many steps in a row with a NaN/inf loss or gradient (each such update is skipped)",
        check=at_least(1),
    )

    def __post_init__(self) -> None:
        validate(self)
        warn_ignored_fields(self)


def engine_settings(config: Config) -> EngineSettings:
    """Where this loop's clients run: `config.engine` with the flat fields on top."""
    return resolve(
        config.engine,
        backend=config.backend,
        ray_address=config.ray_address,
        num_train_workers=config.num_train_workers,
        num_samplers=config.num_samplers,
    )


def main(config: Config) -> Any:
    """Run SFT. Outside an event loop this runs to completion; inside one it returns a coroutine to await."""
    return run_or_await(main_async(config))


async def main_async(config: Config) -> None:
    log_path = Path(config.log_path).expanduser().resolve()
    with RunLock(log_path):
        ml_logger = ml_log.setup_logging(
            log_path,
            config.wandb_project,
            config.wandb_name,
            config=dataclasses.replace(config, engine=engine_settings(config)),  # where it ran
        )
        try:
            await _train(config, log_path, ml_logger)
        finally:
            ml_logger.close()


async def _train(config: Config, log_path: Path, ml_logger: ml_log.MetricsLogger) -> None:
    warn_if_renderer_not_recommended(config.model_name, config.renderer_name)
    service = ServiceClient(base_url=config.base_url, settings=engine_settings(config))
    checkpoints = CheckpointManager(log_path, config.save_every, config.save_every_tokens, config.save_every_seconds)
    training_client, resume = checkpoints.training_client(
        service, config.model_name, config.lora_rank, config.load_checkpoint_path
    )
    start_epoch = resume.get("epoch", 0) if resume else 0
    start_batch = resume.get("batch", 0) if resume else 0
    elapsed_tokens = resume.get("elapsed_tokens", 0) if resume else 0
    tokenizer = training_client.get_tokenizer()

    train_dataset, test_dataset = config.dataset_builder()
    n_batches = len(train_dataset)
    if n_batches == 0:
        raise ValueError("the training dataset has no full batch")
    total_steps = n_batches * config.num_epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    evaluators = [build() for build in config.evaluator_builders]
    if test_dataset is not None and len(test_dataset) > 0:
        evaluators.append(NLLEvaluator.from_dataset(test_dataset, name="test", tokenizer=tokenizer))
    infrequent_evaluators = [build() for build in config.infrequent_evaluator_builders]

    start_step = start_epoch * n_batches + start_batch
    if start_step >= total_steps:
        logger.info("Training was already complete (%d of %d steps done)", start_step, total_steps)
        return
    logger.info(
        "training %s for %d steps (%d batches per epoch, %d epochs), starting at step %d",
        config.model_name,
        total_steps,
        n_batches,
        config.num_epochs,
        start_step,
    )

    nonfinite = NonFiniteGuard(config.max_nonfinite_in_a_row, str(log_path))
    progress = tqdm(total=total_steps, initial=start_step, desc=config.recipe_name, unit="step", dynamic_ncols=True)
    for step in range(start_step, total_steps):
        epoch, batch_index = divmod(step, n_batches)
        if step == start_step or batch_index == 0:
            train_dataset.set_epoch(seed=epoch)  # [quirk] epoch 0 shuffles the seed-0-shuffled rows again
        timer = Timer()
        metrics: dict[str, Any] = {}

        # the resumed-from checkpoint already holds the state before start_step
        if step != start_step and checkpoints.due(step, elapsed_tokens):
            with timer.span("save_checkpoint"):
                checkpoints.save(training_client, f"{step:06d}", {"epoch": epoch, "batch": batch_index}, elapsed_tokens)

        if config.eval_every > 0 and step % config.eval_every == 0:
            with timer.span("evals"):
                metrics.update(await run_evaluators(evaluators, training_client))
        if infrequent_evaluators and config.infrequent_eval_every > 0 and step % config.infrequent_eval_every == 0:
            with timer.span("infrequent_evals"):
                metrics.update(await run_evaluators(infrequent_evaluators, training_client))

        learning_rate = config.learning_rate * compute_schedule_lr_multiplier(config.lr_schedule, step, total_steps)
        with timer.span("get_batch"):
            batch = train_dataset.get_batch(batch_index)
        if step == start_step and batch:
            logger.info("first training datum ([[trained]] tokens):\n%s", describe_datum(batch[0], tokenizer))
        with timer.span("forward_backward"):
            output = training_client.forward_backward(batch, "cross_entropy").result()
        with timer.span("optim_step"):
            optim = training_client.optim_step(
                AdamParams(
                    learning_rate=learning_rate, beta1=config.adam_beta1, beta2=config.adam_beta2, eps=config.adam_eps
                )
            ).result()

        num_tokens = sum(d.model_input.length for d in batch)
        elapsed_tokens += num_tokens
        logprobs = [out["logprobs"] for out in output.loss_fn_outputs]
        weights = [d.loss_fn_inputs["weights"] for d in batch]
        targets = [d.loss_fn_inputs["target_tokens"] for d in batch]
        train_nll = compute_mean_nll(logprobs, weights)
        metrics.update(
            {
                "epoch": epoch,
                "progress": min((step + 1) / total_steps, 1.0),
                "learning_rate": learning_rate,
                "num_sequences": len(batch),
                "num_tokens": num_tokens,
                "num_loss_tokens": float(sum(sum(w.data) for w in weights)),
                "train_mean_nll": train_nll,
                "train_mean_bpb": compute_bpb(logprobs, weights, targets, tokenizer),
                **output.metrics,
                **(optim.metrics or {}),
                **timer.total(),
            }
        )
        ml_logger.log_metrics(metrics, step=step)
        nonfinite.check(step, output.metrics.get("loss:sum", 0.0), metrics, lambda: describe_rows(batch, tokenizer))
        progress.set_postfix(
            loss=f"{train_nll:.4f}",
            lr=f"{learning_rate:.2e}",
            **({"test_nll": f"{metrics['test/nll']:.4f}"} if "test/nll" in metrics else {}),
        )
        progress.update(1)
    progress.close()

    checkpoints.save(training_client, FINAL_CHECKPOINT, {"epoch": config.num_epochs, "batch": 0}, elapsed_tokens)
    logger.info(
        "training done: %d steps, %d tokens; final checkpoint in %s",
        total_steps,
        elapsed_tokens,
        log_path / CHECKPOINTS_DIR / FINAL_CHECKPOINT,
    )


__all__ = ["Config", "main", "main_async"]
