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

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from tqdm import tqdm

from rlhfkit.utils.async_utils import run_or_await
from rlhfkit import checkpoint_utils
from rlhfkit.engine import ServiceClient
from rlhfkit.engine.types import AdamParams, Datum
from rlhfkit.evaluators import EvaluatorBuilder, SamplingClientEvaluator
from rlhfkit.model_info import warn_if_renderer_not_recommended
from rlhfkit.supervised.common import compute_bpb, compute_mean_nll
from rlhfkit.supervised.nll_evaluator import NLLEvaluator
from rlhfkit.supervised.types import SupervisedDatasetBuilder
from rlhfkit.utils import ml_log
from rlhfkit.utils.lr_scheduling import compute_schedule_lr_multiplier

logger = logging.getLogger(__name__)


@dataclass
class Config:
    log_path: str
    model_name: str
    recipe_name: str
    dataset_builder: SupervisedDatasetBuilder
    load_checkpoint_path: str | None = None
    renderer_name: str | None = None
    learning_rate: float = 1e-4
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    num_epochs: int = 1
    lora_rank: int = 32
    evaluator_builders: list[EvaluatorBuilder] = field(default_factory=list)
    infrequent_evaluator_builders: list[EvaluatorBuilder] = field(default_factory=list)
    save_every: int = 20
    save_every_tokens: int = 0  # also save once this many tokens were trained since the last save (0: off)
    save_every_seconds: float = 0.0  # also save once this much wall time passed since the last save (0: off)
    eval_every: int = 10
    infrequent_eval_every: int = 100
    ttl_seconds: int | None = 604800  # accepted for compatibility: local checkpoints never expire
    rolling_save_every: int = 0  # accepted for compatibility (rolling checkpoints are not implemented)
    rolling_ttl_seconds: int = 7200
    async_periodic_saves: bool = False  # accepted; local saves are synchronous
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    wandb_project: str | None = None
    wandb_name: str | None = None
    enable_trace: bool = False  # accepted; tracing is not implemented
    span_chart_every: int = 0
    max_steps: int | None = None
    submit_ahead: int = 1  # accepted; the local engine runs requests synchronously
    base_url: str | None = None
    # Engine backend (ServiceClient): "local" or "ray" (None: RLHFKIT_BACKEND), the Ray cluster's address (None:
    # a local instance; "auto": join), data-parallel training workers and inference engines (None: defaults).
    backend: str | None = None
    ray_address: str | None = None
    num_train_workers: int | None = None
    num_samplers: int | None = None


def main(config: Config) -> Any:
    """Run SFT. Outside an event loop this runs to completion; inside one it returns a coroutine to await."""
    return run_or_await(main_async(config))


class _Timer:
    """Wall time per named span, as time/<name> metrics."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start


def _describe_datum(datum: Datum, tokenizer: Any, limit: int = 1500) -> str:
    """The datum's text with trained tokens wrapped in [[ ]]."""
    tokens = datum.model_input.to_ints()[:1] + datum.loss_fn_inputs["target_tokens"].tolist()
    trained = [False] + [w > 0 for w in datum.loss_fn_inputs["weights"].tolist()]
    pieces = []
    for is_trained, group in itertools.groupby(zip(tokens, trained), key=lambda pair: pair[1]):
        text = tokenizer.decode([token for token, _ in group])
        pieces.append(f"[[{text}]]" if is_trained else text)
    text = "".join(pieces)
    return text if len(text) <= limit else text[:limit] + " ..."


async def _run_evaluators(evaluators: list, training_client: Any) -> dict[str, float]:
    metrics: dict[str, float] = {}
    sampling_client = None
    for evaluator in evaluators:
        if isinstance(evaluator, SamplingClientEvaluator):
            if sampling_client is None:
                sampling_client = training_client.save_weights_and_get_sampling_client()
            metrics.update(await evaluator(sampling_client))
        else:
            metrics.update(await evaluator(training_client))
    return metrics


async def main_async(config: Config) -> None:
    log_path = Path(config.log_path).expanduser().resolve()
    log_path.mkdir(parents=True, exist_ok=True)
    ml_logger = ml_log.setup_logging(log_path, config.wandb_project, config.wandb_name, config=config)
    try:
        await _train(config, log_path, ml_logger)
    finally:
        ml_logger.close()


async def _train(config: Config, log_path: Path, ml_logger: ml_log.MetricsLogger) -> None:
    warn_if_renderer_not_recommended(config.model_name, config.renderer_name)
    service = ServiceClient(base_url=config.base_url, backend=config.backend, ray_address=config.ray_address,
                            num_train_workers=config.num_train_workers, num_samplers=config.num_samplers)
    resume = checkpoint_utils.get_last_checkpoint(log_path)
    if resume is not None:
        logger.info("resuming from checkpoint %s (epoch %s, batch %s)", resume.name, resume.epoch, resume.batch)
        training_client = service.create_training_client_from_state_with_optimizer(resume.state_path)
        start_epoch, start_batch = resume.get("epoch", 0), resume.get("batch", 0)
        elapsed_tokens = resume.get("elapsed_tokens", 0)
    else:
        if config.load_checkpoint_path:
            logger.info("loading weights from %s (fresh optimizer)", config.load_checkpoint_path)
            training_client = service.create_training_client_from_state(config.load_checkpoint_path)
        else:
            training_client = service.create_lora_training_client(config.model_name, rank=config.lora_rank)
        start_epoch, start_batch, elapsed_tokens = 0, 0, 0
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
    logger.info("training %s for %d steps (%d batches per epoch, %d epochs), starting at step %d",
                config.model_name, total_steps, n_batches, config.num_epochs, start_step)

    last_save_time, last_save_tokens = time.monotonic(), elapsed_tokens
    progress = tqdm(total=total_steps, initial=start_step, desc=config.recipe_name, unit="step", dynamic_ncols=True)
    for step in range(start_step, total_steps):
        epoch, batch_index = divmod(step, n_batches)
        if step == start_step or batch_index == 0:
            train_dataset.set_epoch(seed=epoch)  # [quirk] epoch 0 shuffles the seed-0-shuffled rows again
        timer = _Timer()
        step_start = time.perf_counter()
        metrics: dict[str, Any] = {}

        due = step > 0 and (step % config.save_every == 0 if config.save_every > 0 else False)
        due |= config.save_every_tokens > 0 and elapsed_tokens - last_save_tokens >= config.save_every_tokens
        due |= config.save_every_seconds > 0 and time.monotonic() - last_save_time >= config.save_every_seconds
        if due and step != start_step:  # the resumed-from checkpoint already holds this state
            with timer.span("save_checkpoint"):
                checkpoint_utils.save_checkpoint(
                    training_client, f"{step:06d}", log_path,
                    {"epoch": epoch, "batch": batch_index, "elapsed_tokens": elapsed_tokens}, kind="both")
            last_save_time, last_save_tokens = time.monotonic(), elapsed_tokens

        if config.eval_every > 0 and step % config.eval_every == 0:
            with timer.span("evals"):
                metrics.update(await _run_evaluators(evaluators, training_client))
        if infrequent_evaluators and config.infrequent_eval_every > 0 and step % config.infrequent_eval_every == 0:
            with timer.span("infrequent_evals"):
                metrics.update(await _run_evaluators(infrequent_evaluators, training_client))

        learning_rate = config.learning_rate * compute_schedule_lr_multiplier(config.lr_schedule, step, total_steps)
        with timer.span("get_batch"):
            batch = train_dataset.get_batch(batch_index)
        if step == start_step and batch:
            logger.info("first training datum ([[trained]] tokens):\n%s", _describe_datum(batch[0], tokenizer))
        with timer.span("forward_backward"):
            output = training_client.forward_backward(batch, "cross_entropy").result()
        with timer.span("optim_step"):
            optim = training_client.optim_step(AdamParams(learning_rate=learning_rate, beta1=config.adam_beta1,
                                                          beta2=config.adam_beta2, eps=config.adam_eps)).result()

        num_tokens = sum(d.model_input.length for d in batch)
        elapsed_tokens += num_tokens
        logprobs = [out["logprobs"] for out in output.loss_fn_outputs]
        weights = [d.loss_fn_inputs["weights"] for d in batch]
        targets = [d.loss_fn_inputs["target_tokens"] for d in batch]
        train_nll = compute_mean_nll(logprobs, weights)
        metrics.update({
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
            **timer.times,
            "time/total": time.perf_counter() - step_start,
        })
        ml_logger.log_metrics(metrics, step=step)
        progress.set_postfix(loss=f"{train_nll:.4f}", lr=f"{learning_rate:.2e}",
                             **({"test_nll": f"{metrics['test/nll']:.4f}"} if "test/nll" in metrics else {}))
        progress.update(1)
    progress.close()

    checkpoint_utils.save_checkpoint(training_client, "final", log_path,
                                     {"epoch": config.num_epochs, "batch": 0, "elapsed_tokens": elapsed_tokens},
                                     kind="both")
    logger.info("training done: %d steps, %d tokens; final checkpoint in %s", total_steps, elapsed_tokens,
                log_path / "checkpoints" / "final")


__all__ = ["Config", "main", "main_async"]
