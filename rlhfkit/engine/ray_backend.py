"""The Ray backend of ServiceClient: training clients as groups of data-parallel workers (ray_training.py),
sampling clients served by a pool of inference engines per base model (ray_sampling.py)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

from rlhfkit.engine.lora import LoraSpec
from rlhfkit.engine.ray_cluster import actor_resources, connect, default_num_train_workers, import_ray
from rlhfkit.engine.ray_sampling import ENGINES, InferencePool, RaySamplingClient
from rlhfkit.engine.ray_training import RayTrainingClient, start_workers


class RayBackend:
    def __init__(
        self,
        address: str | None,
        num_train_workers: int | None,
        num_samplers: int | None,
        inference_engine: str,
        device: str | None,
        dtype: str | None,
    ):
        if inference_engine not in ENGINES:
            raise ValueError(f"inference_engine={inference_engine!r}: expected one of {', '.join(ENGINES)}")
        connect(address)
        self.num_train_workers = num_train_workers if num_train_workers is not None else default_num_train_workers()
        self.num_samplers = num_samplers if num_samplers is not None else 1
        if self.num_train_workers < 1 or self.num_samplers < 1:
            raise ValueError(
                f"num_train_workers={self.num_train_workers}, num_samplers={self.num_samplers}: both must be >= 1"
            )
        self.inference_engine = inference_engine
        # Placement: every training worker and inference engine gets an equal share of the cluster's GPUs (one
        # each when there are enough).
        self.resources = actor_resources(self.num_train_workers + self.num_samplers)
        self.device, self.dtype = device, dtype
        self._pools: dict[str, InferencePool] = {}
        self._lock = threading.Lock()

    def training_client(self, service: Any, spec: LoraSpec, storage: Path) -> RayTrainingClient:
        """Training workers for `spec`, after the inference engines said they can serve its adapters (so a run
        whose adapter vLLM cannot apply stops before training, not after it with a partly-base sampler)."""
        ray = import_ray()
        workers = start_workers(spec, self.device, self.dtype, self.num_train_workers, self.resources)
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
                    base_model, self.device, self.dtype, self.num_samplers, self.inference_engine, self.resources
                )
            return self._pools[base_model]

    def sampling_client(self, base_model: str, adapter_path: str | None) -> RaySamplingClient:
        return RaySamplingClient(self.pool(base_model), base_model, adapter_path)


@functools.cache
def _ray_backend(
    address: str | None,
    num_train_workers: int | None,
    num_samplers: int | None,
    inference_engine: str,
    device: str | None,
    dtype: str | None,
) -> RayBackend:
    return RayBackend(address, num_train_workers, num_samplers, inference_engine, device, dtype)


def ray_backend(*settings: Any) -> RayBackend:
    """One backend per setting in a process (the arguments of _ray_backend): the stages of a pipeline share its
    inference engines. After `ray.shutdown()` the backends kept are of an instance that is gone (their actor
    handles would make Ray start a new local instance by itself, one nobody shuts down): they are made again."""
    import ray

    if not ray.is_initialized():
        _ray_backend.cache_clear()
    return _ray_backend(*settings)


ray_backend.cache_clear = _ray_backend.cache_clear  # type: ignore[attr-defined]
