"""Pieces shared by the supervised-style training loops: SFT / preference model (`supervised/train.py`) and
DPO (`preference/train_dpo.py`)."""

from __future__ import annotations

import itertools
import logging
from typing import Any

from rlhfkit.engine.types import Datum
from rlhfkit.evaluators import SamplingClientEvaluator
from rlhfkit.engine.clients import TrainingClient

logger = logging.getLogger(__name__)


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


async def run_evaluators(evaluators: list, training_client: TrainingClient) -> dict[str, float]:
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
