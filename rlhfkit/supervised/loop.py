"""Pieces shared by the supervised-style training loops: SFT / preference model (`supervised/train.py`) and
DPO (`preference/train_dpo.py`)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from rlhfkit import checkpoint_utils
from rlhfkit.engine.types import Datum
from rlhfkit.evaluators import SamplingClientEvaluator

logger = logging.getLogger(__name__)


class Timer:
    """Wall time per named span, as time/<name> metrics."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start


def describe_datum(datum: Datum, tokenizer: Any, limit: int = 1500) -> str:
    """The datum's text with trained tokens wrapped in [[ ]]."""
    tokens = datum.model_input.to_ints()[:1] + datum.loss_fn_inputs["target_tokens"].tolist()
    trained = [False] + [w > 0 for w in datum.loss_fn_inputs["weights"].tolist()]
    pieces = []
    for is_trained, group in itertools.groupby(zip(tokens, trained), key=lambda pair: pair[1]):
        text = tokenizer.decode([token for token, _ in group])
        pieces.append(f"[[{text}]]" if is_trained else text)
    text = "".join(pieces)
    return text if len(text) <= limit else text[:limit] + " ..."


async def run_evaluators(evaluators: list, training_client: Any) -> dict[str, float]:
    """Run each evaluator on the live training client, or on one sampling snapshot of its weights."""
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


def open_training_client(service: Any, log_path: Path, model_name: str, lora_rank: int,
                         load_checkpoint_path: str | None) -> tuple[Any, checkpoint_utils.CheckpointRecord | None]:
    """The run's training client and the checkpoint it resumed from (None for a fresh start): the last
    checkpoint in `log_path` with its optimizer state; else `load_checkpoint_path`'s weights with a fresh
    optimizer; else a fresh LoRA adapter on `model_name`."""
    resume = checkpoint_utils.get_last_checkpoint(log_path)
    if resume is not None:
        logger.info("resuming from checkpoint %s (epoch %s, batch %s)", resume.name, resume.epoch, resume.batch)
        return service.create_training_client_from_state_with_optimizer(resume.state_path), resume
    if load_checkpoint_path:
        logger.info("loading weights from %s (fresh optimizer)", load_checkpoint_path)
        return service.create_training_client_from_state(load_checkpoint_path), None
    return service.create_lora_training_client(model_name, rank=lora_rank), None
