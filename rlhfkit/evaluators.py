"""Evaluator interfaces: called during training with the live training client or a sampling snapshot."""

from __future__ import annotations
from rlhfkit.engine.clients import SamplingClient, TrainingClient

from abc import ABC, abstractmethod
from typing import Callable


class TrainingClientEvaluator(ABC):
    """Evaluated on the live training client (e.g. NLL of a test set with a forward pass)."""

    @abstractmethod
    async def __call__(self, training_client: TrainingClient) -> dict[str, float]: ...


class SamplingClientEvaluator(ABC):
    """Evaluated on a sampling client holding the current weights (e.g. a win rate of sampled replies)."""

    @abstractmethod
    async def __call__(self, sampling_client: SamplingClient) -> dict[str, float]: ...


Evaluator = TrainingClientEvaluator | SamplingClientEvaluator
EvaluatorBuilder = Callable[[], Evaluator]
