"""Direct preference optimisation (DPO, Rafailov et al. 2023; spec §12): the policy learns from pairs of a
chosen and a rejected reply directly, without a reward model or sampling.

    from rlhfkit.preference import train_dpo
    train_dpo.main(config)          # in a plain script: runs to completion (asyncio.run inside)
    await train_dpo.main(config)    # inside a running event loop: returns a coroutine

Per step (synchronous): periodic checkpoint of the state *before* this step's update (loop state {epoch,
batch}, so a resume is exact); lr from the schedule; evaluation on the held-out pairs every `eval_every`
steps and at the final step (pre-update weights); per-sequence sums s = Σ_t w_t·logp_t of every datum under
the frozen reference (sampling client, `compute_logprobs`) and under the policy (`forward_backward_custom`,
which backpropagates the loss); Δ = s − s_ref; loss = mean over pairs of −log σ(β(Δ_chosen − Δ_rejected));
one Adam step; one metrics.jsonl record.

Local choices and deviations:
- The reference is the run's initial weights (the base model, or `load_checkpoint_path`), saved once as a
  sampler checkpoint at `log_path/reference_sampler` and reused on resume. (The spec's **[quirk]**: the
  reference snapshots the *resumed* weights, so a resumed run trains against a different reference.)
- Variants: `label_smoothing` ε (conservative DPO: −(1−ε)·log σ(βx) − ε·log σ(−βx)) and `loss_type="ipo"`
  ((x − 1/(2β))², with x from per-sequence *sums* of logprobs as everywhere here; the IPO paper and TRL use
  per-token means).
- The evaluation logs the held-out DPO metrics (test/dpo_loss, test/accuracy, test/margin, ...) besides the
  spec's test/nll, from the same forward pass.
"""

from __future__ import annotations

import dataclasses

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rlhfkit.checkpoint_manager import CheckpointManager
from rlhfkit.compat import compat_setting, warn_ignored_fields
from rlhfkit.config import ConfigError, at_least, between, positive, setting, validate
from rlhfkit.engine import ServiceClient
from rlhfkit.engine.settings import EngineSettings, resolve
from rlhfkit.engine.types import AdamParams, Datum
from rlhfkit.evaluators import EvaluatorBuilder
from rlhfkit.model_info import warn_if_renderer_not_recommended
from rlhfkit.rl.metrics import compute_reference_logprobs
from rlhfkit.run_files import CHECKPOINTS_DIR, FINAL_CHECKPOINT, REFERENCE_SAMPLER_DIR
from rlhfkit.supervised.common import compute_mean_nll
from rlhfkit.supervised.loop import describe_datum, run_evaluators
from rlhfkit.supervised.types import SupervisedDatasetBuilder
from rlhfkit.utils import ml_log
from rlhfkit.utils.async_utils import run_or_await
from rlhfkit.utils.lr_scheduling import compute_schedule_lr_multiplier
from rlhfkit.utils.nonfinite import NonFiniteGuard, describe_rows
from rlhfkit.utils.run_lock import RunLock
from rlhfkit.utils.timing import Timer
from rlhfkit.engine.clients import SamplingClient, TrainingClient

logger = logging.getLogger(__name__)

LossType = Literal["sigmoid", "ipo"]
REFERENCE_DIR = REFERENCE_SAMPLER_DIR  # the frozen reference: the run's initial weights
PLOT_PANELS = [
    ["dpo_loss", "test/dpo_loss"],
    ["accuracy", "test/accuracy"],
    ["margin", "chosen_reward", "rejected_reward"],
    ["test/nll"],
    ["learning_rate"],
]


@dataclass
class Config:
    """The DPO loop's settings (spec §12)."""

    log_path: str = setting(help="run folder: metrics.jsonl, checkpoints, reference_sampler, metrics.png")
    model_name: str = setting(help="base model (embedded name, folder or Hub id)")
    dataset_builder: SupervisedDatasetBuilder = setting(help="DPO pairs, e.g. DPODatasetBuilderFromComparisons")
    recipe_name: str = setting("dpo", "the progress bar's label")
    load_checkpoint_path: str | None = setting(None, "start from these weights (e.g. the SFT state), fresh optimizer")
    renderer_name: str | None = setting(None, "only checked against the model's recommended renderer")
    learning_rate: float = setting(1e-5, "Adam learning rate at step 0", check=positive)
    lr_schedule: Literal["linear", "cosine", "constant"] = setting("linear", "multiplier of learning_rate over the run")
    num_epochs: int = setting(1, "passes over the training pairs", check=at_least(1))
    dpo_beta: float = setting(
        0.1, "beta: strength of the implicit KL regularisation towards the reference", check=positive
    )
    label_smoothing: float = setting(
        0.0,
        "epsilon in [0, 0.5): assumed rate of flipped labels (conservative DPO; sigmoid only)",
        check=between(0.0, 0.499999),
    )
    loss_type: LossType = setting("sigmoid", "sigmoid (DPO) or ipo ((x - 1/(2 beta))^2)")
    lora_rank: int = setting(32, "LoRA rank of a fresh adapter (ignored when loading a checkpoint)", check=at_least(1))
    evaluator_builders: list[EvaluatorBuilder] = setting(help="extra evaluators at eval steps", default_factory=list)
    save_every: int = setting(20, "checkpoint every this many steps (0: only the final one)", check=at_least(0))
    eval_every: int = setting(
        10, "held-out evaluation every this many steps and at the final step (0: final only)", check=at_least(0)
    )
    adam_beta1: float = setting(0.9, "Adam beta1", check=between(0, 1))
    adam_beta2: float = setting(0.95, "Adam beta2", check=between(0, 1))
    adam_eps: float = setting(1e-8, "Adam epsilon", check=positive)
    wandb_project: str | None = setting(None, "Weights & Biases project (None: off)")
    wandb_name: str | None = setting(None, "Weights & Biases run name")
    max_steps: int | None = setting(
        None, "stop after this many steps (None: num_epochs full passes)", check=at_least(1)
    )
    engine: EngineSettings | None = setting(
        None,
        "where the engine runs, the policy and its frozen reference alike (rlhfkit.engine.EngineSettings; "
        "None: the RLHFKIT_* environment)",
    )
    base_url: str | None = setting(None, "the service address; only None (the local engine) is supported")
    max_nonfinite_in_a_row: int = setting(
        3,
        "stop after this many steps in a row with a NaN/inf loss or gradient (each such update is skipped)",
        check=at_least(1),
    )
    reference_model_name: str | None = compat_setting("reference_model_name", None)
    ttl_seconds: int | None = compat_setting("ttl_seconds", 604800)

    def __post_init__(self) -> None:
        validate(self)
        warn_ignored_fields(self)
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ConfigError("label_smoothing", self.label_smoothing, "applies to loss_type='sigmoid' only")


def main(config: Config) -> Any:
    """Run DPO. Outside an event loop this runs to completion; inside one it returns a coroutine to await."""
    return run_or_await(main_async(config))


# --------------------------------------------------------------------------------------------------
# The loss


def dpo_loss(
    chosen_logratio: torch.Tensor,
    rejected_logratio: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: LossType = "sigmoid",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of a batch of pairs and its metrics. `chosen_logratio[i]` = Δ_c = s_policy − s_reference
    of pair i's chosen reply (s = per-sequence sum of trained-token logprobs), `rejected_logratio` likewise;
    x = Δ_c − Δ_r. Loss = mean over pairs of
      sigmoid: −(1−ε)·log σ(βx) − ε·log σ(−βx)   (ε = label_smoothing; ε = 0 is plain DPO)
      ipo:     (x − 1/(2β))²
    Metrics: dpo_loss, accuracy = mean[Δ_c > Δ_r], margin = mean βx, chosen_reward = mean βΔ_c,
    rejected_reward = mean βΔ_r, num_pairs."""
    if chosen_logratio.shape != rejected_logratio.shape or chosen_logratio.ndim != 1:
        raise ValueError(
            f"expected two equal 1-d tensors, got {tuple(chosen_logratio.shape)} and {tuple(rejected_logratio.shape)}"
        )
    x = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        per_pair = -(1 - label_smoothing) * torch.nn.functional.logsigmoid(
            beta * x
        ) - label_smoothing * torch.nn.functional.logsigmoid(-beta * x)
    elif loss_type == "ipo":
        per_pair = (x - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    loss = per_pair.mean()
    with torch.no_grad():
        metrics = {
            "dpo_loss": float(loss.detach()),
            "accuracy": float((x > 0).float().mean()),
            "margin": float((beta * x).mean()),
            "chosen_reward": float((beta * chosen_logratio).mean()),
            "rejected_reward": float((beta * rejected_logratio).mean()),
            "num_pairs": float(len(x)),
        }
    return loss, metrics


def pair_loss_fn(reference_sums: Sequence[float], config: Config) -> Callable:
    """The `forward_backward_custom` loss of a batch of adjacent (chosen, rejected) datums, given each datum's
    reference sum s_ref."""

    def fn(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        sums = torch.stack(
            [(lp * d.loss_fn_inputs["weights"].to_torch().to(lp)).sum() for d, lp in zip(data, logprobs)]
        )
        delta = sums - torch.as_tensor(reference_sums, dtype=sums.dtype, device=sums.device)
        return dpo_loss(delta[0::2], delta[1::2], config.dpo_beta, config.label_smoothing, config.loss_type)

    return fn


# --------------------------------------------------------------------------------------------------
# The steps


def reference_sampler(
    service: ServiceClient, training_client: TrainingClient, log_path: Path, resumed: bool
) -> SamplingClient:
    """The frozen reference: the run's initial weights, saved at the start of a fresh run and reused on resume."""
    path = (log_path / REFERENCE_DIR).resolve()
    if not resumed:
        training_client.save_weights_for_sampler(str(path)).result()
    elif not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: a DPO run resumes against the reference saved when it "
            f"started; start the run again in a new log_path"
        )
    return service.create_sampling_client(model_path=str(path))


async def reference_sums(data: Sequence[Datum], reference: Any) -> list[float]:
    """s_ref = Σ_t w_t·logp_ref(target_t) per datum (all requests issued at once; the engine batches them)."""
    logprobs = await compute_reference_logprobs(list(data), reference)
    return [float(np.dot(lp, d.loss_fn_inputs["weights"].to_numpy())) for d, lp in zip(data, logprobs)]


def paired(batch: list[Datum]) -> list[Datum]:
    """The batch with an odd last datum dropped (spec §12)."""
    return batch[: len(batch) // 2 * 2]


async def evaluate(
    training_client: TrainingClient, test_data: list[Datum], test_reference_sums: list[float], config: Config
) -> dict[str, float]:
    """test/nll of the held-out datums and the DPO metrics of the held-out pairs, from one forward pass."""
    output = training_client.forward(test_data, "cross_entropy").result()
    logprobs = [out["logprobs"].to_torch() for out in output.loss_fn_outputs]
    _, metrics = pair_loss_fn(test_reference_sums, config)(test_data, logprobs)
    nll = compute_mean_nll(logprobs, [d.loss_fn_inputs["weights"] for d in test_data])
    return {"test/nll": nll, **{f"test/{k}": v for k, v in metrics.items()}}


async def main_async(config: Config) -> None:
    log_path = Path(config.log_path).expanduser().resolve()
    log_path.mkdir(parents=True, exist_ok=True)
    with RunLock(log_path):
        ml_logger = ml_log.setup_logging(
            log_path,
            config.wandb_project,
            config.wandb_name,
            config=dataclasses.replace(config, engine=resolve(config.engine)),  # where it ran
            plot_panels=PLOT_PANELS,
        )
        try:
            await _train(config, log_path, ml_logger)
        finally:
            ml_logger.close()


async def _train(config: Config, log_path: Path, ml_logger: ml_log.MetricsLogger) -> None:
    warn_if_renderer_not_recommended(config.model_name, config.renderer_name)
    service = ServiceClient(base_url=config.base_url, settings=resolve(config.engine))
    checkpoints = CheckpointManager(log_path, config.save_every)
    training_client, resume = checkpoints.training_client(
        service, config.model_name, config.lora_rank, config.load_checkpoint_path
    )
    start_epoch, start_batch = (resume.get("epoch", 0), resume.get("batch", 0)) if resume is not None else (0, 0)
    elapsed_tokens = resume.get("elapsed_tokens", 0) if resume is not None else 0
    reference = reference_sampler(service, training_client, log_path, resumed=resume is not None)
    tokenizer = training_client.get_tokenizer()

    train_dataset, test_dataset = config.dataset_builder()
    n_batches = len(train_dataset)
    if n_batches == 0:
        raise ValueError("the DPO training dataset has no full batch")
    total_steps = n_batches * config.num_epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    start_step = start_epoch * n_batches + start_batch
    if start_step >= total_steps:
        logger.info("Training was already complete (%d of %d steps done)", start_step, total_steps)
        return
    test_data = paired(test_dataset.get_batch(0)) if test_dataset is not None and len(test_dataset) > 0 else []
    test_reference_sums = await reference_sums(test_data, reference) if test_data else []
    evaluators = [build() for build in config.evaluator_builders]
    logger.info(
        "DPO on %s for %d steps (%d batches per epoch, %d epochs, %d held-out pairs), starting at step %d",
        config.model_name,
        total_steps,
        n_batches,
        config.num_epochs,
        len(test_data) // 2,
        start_step,
    )

    nonfinite = NonFiniteGuard(config.max_nonfinite_in_a_row, str(log_path))
    progress = tqdm(total=total_steps, initial=start_step, desc=config.recipe_name, unit="step", dynamic_ncols=True)
    for step in range(start_step, total_steps):
        epoch, batch_index = divmod(step, n_batches)
        if step == start_step or batch_index == 0:
            train_dataset.set_epoch(seed=epoch)
        timer = Timer()
        metrics: dict[str, Any] = {}

        # the resumed-from checkpoint already holds the state before start_step
        if step != start_step and checkpoints.due(step):
            with timer.span("save_checkpoint"):
                checkpoints.save(training_client, f"{step:06d}", {"epoch": epoch, "batch": batch_index}, elapsed_tokens)
        if (config.eval_every > 0 and step % config.eval_every == 0) or step == total_steps - 1:
            with timer.span("evals"):
                if test_data:
                    metrics.update(await evaluate(training_client, test_data, test_reference_sums, config))
                metrics.update(await run_evaluators(evaluators, training_client))

        learning_rate = config.learning_rate * compute_schedule_lr_multiplier(config.lr_schedule, step, total_steps)
        with timer.span("get_batch"):
            batch = paired(train_dataset.get_batch(batch_index))
        if not batch:
            raise ValueError(f"DPO batch {batch_index} (epoch {epoch}) has no usable pair; see the warning above")
        if step == start_step:
            logger.info(
                "first DPO pair ([[trained]] tokens):\nchosen: %s\nrejected: %s",
                describe_datum(batch[0], tokenizer),
                describe_datum(batch[1], tokenizer),
            )
        with timer.span("reference_logprobs"):
            batch_reference_sums = await reference_sums(batch, reference)
        with timer.span("forward_backward"):
            output = training_client.forward_backward_custom(batch, pair_loss_fn(batch_reference_sums, config)).result()
        with timer.span("optim_step"):
            optim = training_client.optim_step(
                AdamParams(
                    learning_rate=learning_rate, beta1=config.adam_beta1, beta2=config.adam_beta2, eps=config.adam_eps
                )
            ).result()

        num_tokens = sum(d.model_input.length for d in batch)
        elapsed_tokens += num_tokens
        metrics.update(
            {
                "epoch": epoch,
                "progress": min((step + 1) / total_steps, 1.0),
                "learning_rate": learning_rate,
                "num_tokens": num_tokens,
                **output.metrics,
                **(optim.metrics or {}),
                **timer.total(),
            }
        )
        metrics["batch_time"] = metrics["time/total"]
        ml_logger.log_metrics(metrics, step=step)
        nonfinite.check(step, output.metrics.get("loss:sum", 0.0), metrics, lambda: describe_rows(batch, tokenizer))
        progress.set_postfix(
            loss=f"{metrics['dpo_loss']:.4f}", acc=f"{metrics['accuracy']:.2f}", margin=f"{metrics['margin']:.3f}"
        )
        progress.update(1)
    progress.close()

    checkpoints.save(training_client, FINAL_CHECKPOINT, {"epoch": config.num_epochs, "batch": 0}, elapsed_tokens)
    logger.info(
        "DPO done: %d steps, %d tokens; final checkpoint in %s",
        total_steps,
        elapsed_tokens,
        log_path / CHECKPOINTS_DIR / FINAL_CHECKPOINT,
    )


__all__ = ["Config", "dpo_loss", "main", "main_async"]
