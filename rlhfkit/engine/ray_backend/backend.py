"""The Ray backend of ServiceClient: training clients as groups of data-parallel workers (ray_backend/training.py),
sampling clients served by a pool of inference engines per base model (ray_backend/sampling.py)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

from rlhfkit.engine.model.lora import LoraSpec
from rlhfkit.engine.ray_backend.cluster import actor_resources, connect, default_num_train_workers, import_ray
from rlhfkit.engine.ray_backend.sampling import ENGINES, InferencePool, RaySamplingClient
from rlhfkit.engine.ray_backend.training import RayTrainingClient, start_workers
from rlhfkit.engine.settings import EngineSettings


class RayBackend:
    """The Ray side of one engine settings value (its ray_address, worker counts, inference_engine, device,
    dtype and tuning fields, which every actor receives)."""

    def __init__(self, settings: EngineSettings):
        inference_engine = settings.inference_engine
        if inference_engine not in ENGINES:
            raise ValueError(f"inference_engine={inference_engine!r}: expected one of {', '.join(ENGINES)}")
        connect(settings.ray_address)
        self.settings = settings
        self.num_train_workers = settings.num_train_workers or default_num_train_workers()
        self.num_samplers = settings.num_samplers or 1
        if self.num_train_workers < 1 or self.num_samplers < 1:
            raise ValueError(
                f"num_train_workers={self.num_train_workers}, num_samplers={self.num_samplers}: both must be >= 1"
            )
        self.inference_engine = inference_engine
        # Placement: every training worker and inference engine gets an equal share of the cluster's GPUs (one
        # each when there are enough).
        self.resources = actor_resources(self.num_train_workers + self.num_samplers)
        self._pools: dict[str, InferencePool] = {}
        self._lock = threading.Lock()

    def training_client(self, service: Any, spec: LoraSpec, storage: Path) -> RayTrainingClient:
        """Training workers for `spec`, after the inference engines said they can serve its adapters (so a run
        whose adapter vLLM cannot apply stops before training, not after it with a partly-base sampler)."""
        ray = import_ray()
        workers = start_workers(spec, self.settings, self.num_train_workers, self.resources)
        try:
            self.pool(spec.base_model).check_lora_targets(ray.get(workers[0].adapted_modules.remote()), spec.rank)
        except BaseException:
            for worker in workers:
                ray.kill(worker)
            raise
        return RayTrainingClient(service, spec, workers, storage)

    def pool(self, base_model: str) -> InferencePool:
        """The inference engines of `base_model` (started on first use, shared by every sampling client)."""
        with self._lock:
            if base_model not in self._pools:
                self._pools[base_model] = InferencePool(
                    base_model, self.settings, self.num_samplers, self.inference_engine, self.resources
                )
            return self._pools[base_model]

    def sampling_client(self, base_model: str, adapter_path: str | None) -> RaySamplingClient:
        return RaySamplingClient(self.pool(base_model), base_model, adapter_path)


@functools.cache
def _ray_backend(settings: EngineSettings) -> RayBackend:
    return RayBackend(settings)


def ray_backend(settings: EngineSettings) -> RayBackend:
    """One backend per settings value in a process: the stages of a pipeline share its inference engines. After `ray.shutdown()` the backends kept are of an instance that is gone (their actor
    handles would make Ray start a new local instance by itself, one nobody shuts down): they are made again."""
    import ray

    if not ray.is_initialized():
        _ray_backend.cache_clear()
    return _ray_backend(settings)


ray_backend.cache_clear = _ray_backend.cache_clear  # type: ignore[attr-defined]
