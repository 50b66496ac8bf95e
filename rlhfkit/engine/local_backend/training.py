"""The local training client: a LoRA trainer (trainer.py) in this process, behind the engine's futures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhfkit.engine.clients import TrainingClient
from rlhfkit.engine.futures import APIFuture, RequestQueue, on_compute_thread, uses_compute_thread
from rlhfkit.engine.model.lora import LoraSpec, read_meta, read_spec
from rlhfkit.engine.model.base import Precision, load_tokenizer
from rlhfkit.engine.torch_engine.trainer import LoraTrainer
from rlhfkit.engine.types import AdamParams, Datum, ForwardBackwardOutput, OptimStepResponse, SaveWeightsResponse


def resolve_checkpoint_path(storage: Path, name: str, kind: str) -> Path:
    """A plain name goes under the client's storage folder (`storage/kind/name`); a path is used as given."""
    path = Path(name).expanduser()
    return path if path.is_absolute() or len(path.parts) > 1 else storage / kind / name


class LocalTrainingClient(TrainingClient):
    """A LoRA model being trained, in this process. Every method submits its request (to the process's compute
    thread on a CPU, else to the client's own worker thread) and returns an APIFuture at once; requests run in
    submission order (futures.py states the contract). Each method has an `_async` twin that returns the future
    after submission."""

    def __init__(self, service: Any, spec: LoraSpec, precision: Precision, storage: Path):
        self.service = service
        self.spec = spec
        self.precision = precision
        self.storage = storage
        self.trainer = on_compute_thread(
            precision.device, LoraTrainer, spec, precision, service.settings.microbatch_tokens
        )
        self._queue = RequestQueue("rlhfkit-training", shared=uses_compute_thread(precision.device))

    @property
    def model(self):
        """The PEFT model (local backend only)."""
        return self.trainer.model

    @property
    def optimizer_steps(self) -> int:
        return self.trainer.optimizer_steps

    # ---------------------------------------------------------------------------------------------
    # Requests

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        LoraTrainer.check(data, loss_fn)  # bad input fails at submission
        return self._queue.submit(self.trainer.forward_backward, list(data), loss_fn, loss_fn_config, True)

    def forward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        LoraTrainer.check(data, loss_fn)
        return self._queue.submit(self.trainer.forward_backward, list(data), loss_fn, loss_fn_config, False)

    def forward_backward_custom(self, data: Sequence[Datum], fn: Callable) -> APIFuture[ForwardBackwardOutput]:
        """`fn(data, logprobs_list) -> (loss, metrics)` over the whole batch's target logprobs (with grad)."""
        LoraTrainer.check(data, "custom")
        return self._queue.submit(self.trainer.forward_backward_custom, list(data), fn)

    def optim_step(self, params: AdamParams) -> APIFuture[OptimStepResponse]:
        return self._queue.submit(self.trainer.optim_step, params)

    def _save(self, name: str | None, kind: str) -> APIFuture[SaveWeightsResponse]:
        """name None: `for-sampler-<optimizer steps>` (counted when the request runs)."""

        def run() -> SaveWeightsResponse:
            folder = name if name is not None else f"for-sampler-{self.trainer.optimizer_steps:06d}"
            return SaveWeightsResponse(
                path=self.trainer.save(resolve_checkpoint_path(self.storage, folder, kind), kind)
            )

        return self._queue.submit(run)

    def save_state(self, name: str, ttl_seconds: int | None = None) -> APIFuture[SaveWeightsResponse]:
        """Adapter weights + optimizer state + RNG state, in a directory written atomically."""
        return self._save(name, "state")

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None) -> APIFuture[SaveWeightsResponse]:
        """Adapter weights only, for create_sampling_client(model_path=...)."""
        return self._save(name, "sampler")

    def save_weights_and_get_sampling_client(self, name: str | None = None):
        """A sampling client on the current weights (after every request submitted before): built in memory
        with the local sampler; with the vLLM sampler, the weights are saved first (vLLM's process reads them
        from disk)."""
        from rlhfkit.engine.torch_engine.sampler import SamplingClient

        if getattr(self.service, "sampler", "local") == "vllm":
            path = self._save(name, "sampler").result().path
            return self.service.create_sampling_client(model_path=path)
        tensors = self._queue.submit(self.trainer.adapter_tensors).result()
        return SamplingClient.from_adapter(self.spec, tensors, self.precision, self.service.settings)

    def create_sampling_client(self, model_path: str):
        return self.service.create_sampling_client(model_path=model_path)

    def load_state(self, path: str) -> APIFuture[None]:
        """Load adapter weights only (the optimizer starts fresh)."""
        return self._queue.submit(self.trainer.load, path, False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[None]:
        return self._queue.submit(self.trainer.load, path, True)

    def get_tokenizer(self):
        return load_tokenizer(self.spec.base_model)

    def get_info(self) -> dict:
        return {
            "base_model": self.spec.base_model,
            "lora_rank": self.spec.rank,
            "device": str(self.precision.device),
            "dtype": str(self.precision.compute_dtype),
        }


def spec_from_checkpoint(path: str) -> LoraSpec:
    return read_spec(path)


def describe_checkpoint(path: str) -> str:
    return json.dumps(read_meta(path), indent=2)
