"""The engine's two client interfaces, under the names the reference uses: `TrainingClient` and `SamplingClient`.

Every backend implements them: the local backend (`local_backend.training.LocalTrainingClient`, the torch
engine's `torch_engine.sampler.SamplingClient`, `local_backend.vllm_client.VLLMSamplingClient`), the Ray backend
(`ray_backend.training.RayTrainingClient`, `ray_backend.sampling.RaySamplingClient`). Recipes type their clients
with these two names only. The execution contract (futures, ordering, errors) is stated once, in futures.py. No
torch here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

from rlhfkit.engine.futures import APIFuture
from rlhfkit.engine.sampling_api import SamplingAPI
from rlhfkit.engine.types import AdamParams, Datum, ForwardBackwardOutput, OptimStepResponse, SaveWeightsResponse

SamplingClient = SamplingAPI  # the sampling interface: sample, compute_logprobs, score_next_token (+ async, batch)


class TrainingClient(ABC):
    """A LoRA model being trained. Every method submits its request and returns an APIFuture at once; the
    requests of one client run one at a time, in submission order. The `_async` twins (defined here, once, for
    every backend) return the future after submission: `fut = await tc.forward_backward_async(...)`."""

    @abstractmethod
    def forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """The named loss (a sum over the data) and its gradient, accumulated until optim_step."""

    @abstractmethod
    def forward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """The same outputs without a gradient (every position's logprob)."""

    @abstractmethod
    def forward_backward_custom(self, data: Sequence[Datum], fn: Callable) -> APIFuture[ForwardBackwardOutput]:
        """`fn(data, logprobs_list) -> (loss, metrics)` over the batch's target logprobs, and its gradient."""

    @abstractmethod
    def optim_step(self, params: AdamParams) -> APIFuture[OptimStepResponse]:
        """One Adam step on the accumulated gradients."""

    @abstractmethod
    def save_state(self, name: str, ttl_seconds: int | None = None) -> APIFuture[SaveWeightsResponse]:
        """Adapter weights, optimizer and RNG state, in a folder written atomically."""

    @abstractmethod
    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None) -> APIFuture[SaveWeightsResponse]:
        """Adapter weights only, for create_sampling_client(model_path=...)."""

    @abstractmethod
    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """A sampling client on the current weights (after every request submitted before)."""

    @abstractmethod
    def create_sampling_client(self, model_path: str) -> SamplingClient:
        """A sampling client on saved weights."""

    @abstractmethod
    def load_state(self, path: str) -> APIFuture[None]:
        """Adapter weights only; the optimizer starts fresh."""

    @abstractmethod
    def load_state_with_optimizer(self, path: str) -> APIFuture[None]:
        """Adapter weights, Adam state, step count and RNG state."""

    @abstractmethod
    def get_tokenizer(self) -> Any:
        """The base model's Hugging Face tokenizer."""

    @abstractmethod
    def get_info(self) -> dict:
        """base_model, lora_rank, where it runs."""

    # The awaitable forms
    async def forward_backward_async(self, data, loss_fn, loss_fn_config=None):
        return self.forward_backward(data, loss_fn, loss_fn_config)

    async def forward_async(self, data, loss_fn, loss_fn_config=None):
        return self.forward(data, loss_fn, loss_fn_config)

    async def forward_backward_custom_async(self, data, fn):
        return self.forward_backward_custom(data, fn)

    async def optim_step_async(self, params):
        return self.optim_step(params)

    async def save_state_async(self, name, ttl_seconds=None):
        return self.save_state(name, ttl_seconds)

    async def save_weights_for_sampler_async(self, name, ttl_seconds=None):
        return self.save_weights_for_sampler(name, ttl_seconds)

    async def save_weights_and_get_sampling_client_async(self, name=None):
        return self.save_weights_and_get_sampling_client(name)

    async def load_state_async(self, path):
        return self.load_state(path)

    async def load_state_with_optimizer_async(self, path):
        return self.load_state_with_optimizer(path)
