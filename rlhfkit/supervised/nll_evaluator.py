"""Mean NLL (and bits per byte) of a fixed set of datums under the current training weights."""

from __future__ import annotations

from typing import Any

from rlhfkit.engine.types import Datum
from rlhfkit.evaluators import TrainingClientEvaluator
from rlhfkit.supervised.common import compute_bpb, compute_mean_nll
from rlhfkit.supervised.types import SupervisedDataset
from rlhfkit.engine.clients import TrainingClient


class NLLEvaluator(TrainingClientEvaluator):
    """Returns {name/nll} and, with a tokenizer, {name/bpb}; a forward pass only (no gradient)."""

    def __init__(self, data: list[Datum], name: str = "test", tokenizer: Any = None):
        if not data:
            raise ValueError(f"NLLEvaluator {name!r} got no data")
        self.data, self.name, self.tokenizer = data, name, tokenizer

    @classmethod
    def from_dataset(cls, dataset: SupervisedDataset, name: str = "test", tokenizer: Any = None) -> NLLEvaluator:
        return cls([datum for i in range(len(dataset)) for datum in dataset.get_batch(i)], name, tokenizer)

    async def __call__(self, training_client: TrainingClient) -> dict[str, float]:
        future = await training_client.forward_async(self.data, "cross_entropy")
        output = await future.result_async()
        logprobs = [out["logprobs"] for out in output.loss_fn_outputs]
        weights = [d.loss_fn_inputs["weights"] for d in self.data]
        metrics = {f"{self.name}/nll": compute_mean_nll(logprobs, weights)}
        if self.tokenizer is not None:
            targets = [d.loss_fn_inputs["target_tokens"] for d in self.data]
            metrics[f"{self.name}/bpb"] = compute_bpb(logprobs, weights, targets, self.tokenizer)
        return metrics
