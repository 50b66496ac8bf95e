"""Inference on Ray: a pool of inference-engine actors serving every model of the pipeline as a LoRA adapter
of one base, and the sampling client of the Ray backend.

An inference-engine actor implements:
    load_adapter(adapter_id, path)                        # a checkpoint folder with PEFT files; idempotent
    sample(adapter_id, [(prompt tokens, num_samples, SamplingParams)]) -> [SampleResponse]
    score_next_token(adapter_id, prompts, candidates) -> [NextTokenScores]
    compute_logprobs(adapter_id, prompts) -> [[float | None]]
    check_lora_targets(modules, rank)                     # raises when it could not serve such an adapter
    health() -> {"engine": name, ...}
(adapter_id None = the base model). `TorchInferenceWorker` (here) runs the local sampler's code; the vLLM
engine is `vllm_engine.inference.VLLMInferenceWorker` (native LoRA, in the vLLM environment's Python). `EngineLaunch`
is the one place that knows how each kind is started (class, constructor arguments, actor options). Every method
runs on every engine (vLLM's prompt logprobs included: vllm_engine/cpu_ops.py makes them work on the CPU build).

The pool gives each checkpoint a fresh adapter id (a new version never reuses an id), loads it into an engine
lazily before the engine's first request for it, sends the samples of one prompt to one engine (a group's
replies share their prompt's prefix), and, when an engine actor dies, starts a new one and retries its
requests there.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from rlhfkit.engine.model.base import load_tokenizer
from rlhfkit.engine.ray_backend.cluster import import_ray
from rlhfkit.engine.sampling_api import SamplingAPI
from rlhfkit.engine.settings import EngineSettings
from rlhfkit.engine.types import ModelInput, NextTokenScores, SampleResponse, SamplingParams
from rlhfkit.errors import UserError

logger = logging.getLogger(__name__)

MAX_ADAPTERS = 8  # adapters a torch engine keeps over its one base (each costs its adapter, not a model copy)
RETRIES = 3  # attempts of a request whose engine died
ENGINES = ("torch", "vllm")


class InferenceEngineStartError(RuntimeError):
    """An inference-engine actor failed in its constructor (e.g. vLLM cannot run the model on this build)."""


class UnsupportedLoraTargetsError(UserError):
    """The inference engine cannot serve an adapter of the run's LoRA settings (raised before training)."""


class TorchInferenceWorker:
    """An inference engine running the local sampler (sampling.py) on one base model: the base weights are
    loaded once per process; an adapter is merged into a copy of them on first use and kept (least recently
    used first out), so switching adapters between requests loads no weights from disk."""

    def __init__(self, base_model: str, settings: EngineSettings):
        import torch

        from rlhfkit.engine.model.base import pick_precision

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.base_model = base_model
        self.precision = pick_precision(settings.device, settings.dtype)
        self.settings = settings
        self.paths: dict[str, str] = {}
        self.clients: OrderedDict[str | None, Any] = OrderedDict()

    def load_adapter(self, adapter_id: str, path: str) -> None:
        self.paths[adapter_id] = path

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget an adapter no sampling client holds any more (its tensors and caches are freed)."""
        self.paths.pop(adapter_id, None)
        self.clients.pop(adapter_id, None)

    def _client(self, adapter_id: str | None) -> Any:
        from rlhfkit.engine.model.lora import LoraSpec, load_adapter_tensors, read_meta
        from rlhfkit.engine.torch_engine.sampler import SamplingClient

        if adapter_id not in self.clients:
            if adapter_id is None:
                self.clients[None] = SamplingClient.from_base(self.base_model, self.precision, self.settings)
            else:
                if adapter_id not in self.paths:
                    raise KeyError(f"adapter {adapter_id!r} was not loaded into this engine")
                path = self.paths[adapter_id]
                spec = LoraSpec(**{**read_meta(path)["lora"], "base_model": self.base_model})
                self.clients[adapter_id] = SamplingClient.from_adapter(
                    spec, load_adapter_tensors(path), self.precision, self.settings
                )
            while len(self.clients) > MAX_ADAPTERS:
                self.clients.popitem(last=False)
        self.clients.move_to_end(adapter_id)
        return self.clients[adapter_id]

    def sample(
        self, adapter_id: str | None, requests: list[tuple[list[int], int, SamplingParams]]
    ) -> list[SampleResponse]:
        return self._client(adapter_id).sample_batch(
            [(ModelInput.from_ints(p), n, params) for p, n, params in requests]
        )

    def score_next_token(
        self, adapter_id: str | None, prompts: list[list[int]], candidates: list[int]
    ) -> list[NextTokenScores]:
        return self._client(adapter_id).score_next_token_batch([ModelInput.from_ints(p) for p in prompts], candidates)

    def compute_logprobs(self, adapter_id: str | None, prompts: list[list[int]]) -> list[list[float | None]]:
        return self._client(adapter_id).compute_logprobs_batch([ModelInput.from_ints(p) for p in prompts])

    def check_lora_targets(self, modules: list[str], rank: int | None = None) -> None:
        """Any adapter works here: it is merged into the base's linear weights."""

    def health(self) -> dict:
        return {
            "engine": "torch",
            "pid": os.getpid(),
            "adapters_loaded": [a for a in self.clients if a is not None],
        }


def default_inference_engine(settings: EngineSettings) -> str:
    """vllm when a Python with vLLM is found (launch.vllm_python: settings.vllm_python, .venv-vllm, or this
    Python), else torch."""
    from rlhfkit.engine.vllm_engine.launch import VLLMUnavailableError, vllm_python

    try:
        vllm_python(settings.vllm_python)
    except VLLMUnavailableError:
        return "torch"
    return "vllm"


@dataclass(frozen=True)
class EngineLaunch:
    """How one inference-engine actor of kind `inference_engine` is started: its class, constructor arguments
    and extra actor options (the vLLM engine runs in the vLLM environment's Python, with its own work folder)."""

    engine: type
    args: tuple
    kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, kind: str, base_model: str, settings: EngineSettings) -> EngineLaunch:
        if kind == "torch":
            return cls(TorchInferenceWorker, (base_model, settings))
        if kind == "vllm":
            from rlhfkit.engine.model.base import pick_precision, resolve_base_model
            from rlhfkit.engine.vllm_engine.inference import VLLMInferenceWorker
            from rlhfkit.engine.vllm_engine.launch import engine_kwargs, ray_actor_options, vllm_python
            from rlhfkit.paths import cache_dir

            work_dir = cache_dir() / "vllm" / f"ray-engine-{uuid.uuid4().hex[:12]}"  # adapter copies, registry
            dtype_name = str(pick_precision(settings.device, settings.dtype).compute_dtype).removeprefix("torch.")
            return cls(
                VLLMInferenceWorker,
                (resolve_base_model(base_model), str(work_dir)),
                {"dtype": dtype_name, **engine_kwargs(settings)},
                ray_actor_options(vllm_python(settings.vllm_python)),
            )
        raise ValueError(f"inference_engine={kind!r}: expected one of {', '.join(ENGINES)}")

    def start(self, resources: dict[str, float]) -> Any:
        ray = import_ray()
        return (
            ray.remote(self.engine)
            .options(**resources, max_restarts=0, **self.options)
            .remote(*self.args, **self.kwargs)
        )


class InferencePool:
    """K engine actors on one base model (see the module docstring)."""

    def __init__(
        self,
        base_model: str,
        settings: EngineSettings,
        num_engines: int,
        kind: str,
        resources: dict[str, float],
    ):
        self.base_model, self.settings, self.kind = base_model, settings, kind
        self.resources = resources
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.paths: dict[str, str] = {}
        self.actors = [self._start() for _ in range(num_engines)]
        self.loaded: list[set[str]] = [set() for _ in self.actors]
        self.restarts = 0
        ray = import_ray()
        try:
            ray.get(self.actors[0].health.remote())
        except ray.exceptions.RayActorError as e:  # its constructor failed: say which engine, and the way out
            raise InferenceEngineStartError(
                f"inference_engine={kind}: the inference engine for {base_model} did not start"
                f"{'; inference_engine=torch runs every model the local backend runs' if kind != 'torch' else ''}"
                f" ({type(e).__name__}: {e})"
            ) from None

    def _start(self) -> Any:
        return EngineLaunch.of(self.kind, self.base_model, self.settings).start(self.resources)

    def check_lora_targets(self, modules: list[str], rank: int) -> None:
        """Stop (UnsupportedLoraTargetsError, naming the setting to change) when the engines could not serve an
        adapter on `modules` of LoRA rank `rank`: vLLM adapts only the modules it wraps, and would otherwise
        ignore the others with a warning and sample a partly-base model."""
        from rlhfkit.engine.vllm_engine.core import UnsupportedAdapterError

        ray = import_ray()
        try:
            ray.get(self.actors[0].check_lora_targets.remote(modules, rank))
        except UnsupportedAdapterError as e:  # Ray's error is also an instance of the engine's
            raise UnsupportedLoraTargetsError(f"inference_engine={self.kind}: {getattr(e, 'cause', e)}") from None

    def register(self, path: str) -> str:
        """A fresh adapter id for the checkpoint folder `path`."""
        with self._lock:
            adapter_id = f"adapter-{next(self._ids)}"
            self.paths[adapter_id] = path
        return adapter_id

    def release(self, adapter_id: str) -> None:
        """The adapter's sampling client is gone: torch engines that loaded it drop it now (vLLM engines keep
        their own least-recently-used set of max_loras adapters). Called from a finalizer: never raises."""
        with self._lock:
            self.paths.pop(adapter_id, None)
            engines = [i for i, loaded in enumerate(self.loaded) if adapter_id in loaded]
            for i in engines:
                self.loaded[i].discard(adapter_id)
            actors = [self.actors[i] for i in engines] if self.kind == "torch" else []
        import ray

        if not ray.is_initialized():  # Ray was shut down: its engines are gone (and .remote() would start a new Ray)
            return
        for actor in actors:
            with contextlib.suppress(Exception):  # a dead engine, or Ray shutting down at exit
                actor.unload_adapter.remote(adapter_id)

    def _submit(self, engine: int, method: str, adapter_id: str | None, *args: Any) -> tuple[Any, Any, Any]:
        """Submit to one engine (loading the adapter first if it has not got it); returns (actor, the load's ref
        or None, the request's ref)."""
        with self._lock:
            actor = self.actors[engine]
            load = None
            if adapter_id is not None and adapter_id not in self.loaded[engine]:
                load = actor.load_adapter.remote(adapter_id, self.paths[adapter_id])  # runs before the request
                self.loaded[engine].add(adapter_id)
            return actor, load, getattr(actor, method).remote(adapter_id, *args)

    def _replace(self, engine: int, dead: Any) -> None:
        ray = import_ray()
        with self._lock:
            if self.actors[engine] is not dead:
                return  # another request replaced it already
            logger.warning("inference engine %d died; starting a new one and retrying its requests", engine)
            with contextlib.suppress(Exception):  # already gone
                ray.kill(dead, no_restart=True)
            self.actors[engine] = self._start()
            self.loaded[engine] = set()
            self.restarts += 1

    def _run_on(self, engine: int, method: str, adapter_id: str | None, *args: Any) -> list[Any]:
        ray = import_ray()
        for attempt in range(RETRIES):
            actor, load, ref = self._submit(engine, method, adapter_id, *args)
            try:
                if load is not None:
                    try:
                        ray.get(load)  # a refused adapter: its own error, not the request's "unknown adapter"
                    except ray.exceptions.RayTaskError:
                        with self._lock:
                            self.loaded[engine].discard(adapter_id)  # type: ignore[arg-type]
                        raise
                return ray.get(ref)
            except ray.exceptions.RayActorError:
                if attempt == RETRIES - 1:
                    raise
                self._replace(engine, actor)
        raise AssertionError("unreachable")

    def run(
        self, method: str, adapter_id: str | None, items: list[Any], *args: Any, keys: Sequence[Any] = ()
    ) -> list[Any]:
        """`method` over `items` split across the engines (items with the same key on one engine; without
        keys, contiguous chunks); results in item order."""
        engines = len(self.actors)
        if keys:
            slots = {key: i % engines for i, key in enumerate(dict.fromkeys(keys))}
            assignment = [slots[key] for key in keys]
        else:
            assignment = [i * engines // max(len(items), 1) for i in range(len(items))]
        parts = [[i for i, e in enumerate(assignment) if e == engine] for engine in range(engines)]
        refs = []
        for engine, indices in enumerate(parts):
            if indices:
                refs.append(
                    (
                        indices,
                        _pool_executor().submit(
                            self._run_on, engine, method, adapter_id, [items[i] for i in indices], *args
                        ),
                    )
                )
        results: list[Any] = [None] * len(items)
        for indices, future in refs:
            for i, value in zip(indices, future.result()):
                results[i] = value
        return results


_executor_lock = threading.Lock()
_executor: Any = None


def _pool_executor() -> Any:
    """Threads that wait for the engines' results (one request per engine at a time per client batch)."""
    global _executor
    import concurrent.futures

    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rlhfkit-pool")
        return _executor


class RaySamplingClient(SamplingAPI):
    """The SamplingAPI of the Ray backend: a base model or one adapter version, served by a pool (each batch
    primitive is one `InferencePool.run`, split across the engines; the samples of one prompt go to one)."""

    def __init__(self, pool: InferencePool, base_model: str, adapter_path: str | None):
        super().__init__("rlhfkit-ray-sampling")
        self.pool = pool
        self.base_model = base_model
        self.adapter_path = adapter_path
        self.adapter_id = pool.register(adapter_path) if adapter_path is not None else None
        self.tokenizer = load_tokenizer(base_model)
        if self.adapter_id is not None:  # dropped: the engines free the adapter (an RL run makes one per step)
            weakref.finalize(self, pool.release, self.adapter_id).atexit = False

    def _sample_many(self, requests: list[tuple[ModelInput, int, SamplingParams]]) -> list[SampleResponse]:
        items = [(p.to_ints(), n, params) for p, n, params in requests]
        return self.pool.run("sample", self.adapter_id, items, keys=[tuple(p) for p, _, _ in items])

    def _logprobs_many(self, prompts: list[ModelInput]) -> list[list[float | None]]:
        return self.pool.run("compute_logprobs", self.adapter_id, [p.to_ints() for p in prompts])

    def _score_many(self, prompts: list[ModelInput], candidates: list[int]) -> list[NextTokenScores]:
        return self.pool.run("score_next_token", self.adapter_id, [p.to_ints() for p in prompts], candidates)
