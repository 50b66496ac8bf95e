"""The entry point of the engine: creates training and sampling clients, on the local (in-process) backend or
the Ray backend (ray_backend/backend.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

from rlhfkit.engine.model.allocator import share_one_arena
from rlhfkit.engine.model.lora import LoraSpec, load_adapter_tensors, read_spec
from rlhfkit.engine.model.base import pick_precision
from rlhfkit.engine.torch_engine.sampler import SamplingClient
from rlhfkit.engine.sampling_api import SamplingAPI
from rlhfkit.engine.settings import EngineSettings
from rlhfkit.engine.clients import TrainingClient
from rlhfkit.engine.local_backend.training import LocalTrainingClient
from rlhfkit.paths import cache_dir


class ServiceClient:
    """Local stand-in for the reference's remote service. `base_url` is accepted for compatibility and must
    be None (the local backend runs in this process). Checkpoints saved by plain name go under
    `storage_dir` (default ~/.cache/rlhfkit/runs); absolute paths are used as given.

    `sampler`: "local" (default; generation in this process) or "vllm" (generation by a vLLM engine in its own
    process, see local_backend/vllm_client.py); default from RLHFKIT_SAMPLER. Training and scoring are always local.

    `backend`: "local" (default) or "ray" (default from RLHFKIT_BACKEND): training clients become groups of
    `num_train_workers` data-parallel Ray actors (default: one per GPU of the cluster, else 1) and sampling
    clients are served by `num_samplers` inference-engine actors (default 1) of kind `inference_engine`
    ("torch" or "vllm"; default RLHFKIT_INFERENCE_ENGINE, else vllm when a Python with vLLM is found (see
    vllm_engine.launch.vllm_python), else torch; docs/cluster.md). `ray_address`: None starts a local Ray
    instance, "auto" joins a running cluster (default RLHFKIT_RAY_ADDRESS). RLHFKIT_NUM_TRAIN_WORKERS and
    RLHFKIT_NUM_SAMPLERS give the counts' defaults. The storage folder must be shared by the cluster's nodes."""

    def __init__(
        self,
        base_url: str | None = None,
        user_metadata: dict | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        storage_dir: str | None = None,
        sampler: str | None = None,
        backend: str | None = None,
        ray_address: str | None = None,
        num_train_workers: int | None = None,
        num_samplers: int | None = None,
        inference_engine: str | None = None,
        settings: EngineSettings | None = None,
    ):
        if base_url is not None:
            raise ValueError(f"base_url={base_url!r}: only the local in-process backend exists; pass None")
        # One settings value; without one, the RLHFKIT_* environment (read by EngineSettings.from_env only).
        # The keyword arguments override it.
        settings = (settings if settings is not None else EngineSettings.from_env()).merged(
            device=device,
            dtype=dtype,
            sampler=sampler,
            backend=backend,
            ray_address=ray_address,
            num_train_workers=num_train_workers,
            num_samplers=num_samplers,
            inference_engine=inference_engine,
        )
        self.settings = settings
        share_one_arena()  # before any client thread starts: its freed memory is reused by the next (allocator.py)
        self.precision = pick_precision(settings.device, settings.dtype)
        self.storage_dir = Path(storage_dir) if storage_dir else cache_dir() / "runs"
        self.sampler = settings.sampler or "local"
        self.backend = settings.backend or "local"
        self._ray = None
        if self.backend == "ray":
            from rlhfkit.engine.ray_backend.backend import ray_backend
            from rlhfkit.engine.ray_backend.sampling import default_inference_engine

            self._ray = ray_backend(
                settings.merged(inference_engine=settings.inference_engine or default_inference_engine(settings))
            )

    def _training_client(self, spec: LoraSpec) -> TrainingClient:
        storage = self.storage_dir / uuid.uuid4().hex[:12]
        if self._ray is not None:
            return self._ray.training_client(self, spec, storage)  # type: ignore[return-value]
        return LocalTrainingClient(self, spec, self.precision, storage)

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict | None = None,
    ) -> TrainingClient:
        return self._training_client(
            LoraSpec(
                base_model,
                rank=rank,
                seed=seed,
                train_mlp=train_mlp,
                train_attn=train_attn,
                train_unembed=train_unembed,
            )
        )

    def create_training_client_from_state(self, path: str, user_metadata: dict | None = None) -> TrainingClient:
        """Adapter weights from a saved state (or sampler weights); a fresh optimizer."""
        client = self._training_client(read_spec(path))
        client.load_state(path).result()
        return client

    def create_training_client_from_state_with_optimizer(
        self, path: str, user_metadata: dict | None = None
    ) -> TrainingClient:
        client = self._training_client(read_spec(path))
        client.load_state_with_optimizer(path).result()
        return client

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> SamplingAPI:
        """`model_path`: a directory from save_weights_for_sampler or save_state; else the plain base_model."""
        spec, adapter = None, None
        if model_path is None:
            if base_model is None:
                raise ValueError("create_sampling_client: give model_path or base_model")
        else:
            spec = read_spec(model_path)
            if base_model is not None and base_model != spec.base_model:
                spec = LoraSpec(**{**spec.__dict__, "base_model": base_model})
            base_model, adapter = spec.base_model, str(Path(model_path).resolve())
        if self._ray is not None:
            return self._ray.sampling_client(base_model, adapter)
        if self.sampler == "vllm":
            from rlhfkit.engine.local_backend.vllm_client import VLLMSamplingClient

            return VLLMSamplingClient(spec, base_model, adapter, self.precision, self.settings)
        if spec is None:
            return SamplingClient.from_base(base_model, self.precision, self.settings)
        return SamplingClient.from_adapter(spec, load_adapter_tensors(adapter), self.precision, self.settings)

    # Awaitable forms
    async def create_lora_training_client_async(self, *args, **kwargs) -> TrainingClient:
        return self.create_lora_training_client(*args, **kwargs)

    async def create_training_client_from_state_async(self, path, user_metadata=None) -> TrainingClient:
        return self.create_training_client_from_state(path)

    async def create_training_client_from_state_with_optimizer_async(self, path, user_metadata=None):
        return self.create_training_client_from_state_with_optimizer(path)

    async def create_sampling_client_async(self, model_path=None, base_model=None) -> SamplingAPI:
        return self.create_sampling_client(model_path, base_model)
