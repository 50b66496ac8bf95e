"""The vLLM sampling backend: generation by a vLLM engine in a separate process (optional; see README).

`ServiceClient(settings=EngineSettings(sampler="vllm"))` makes every sampling client generate through one
vLLM engine per base model, started on first use with the Python named by the setting vllm_python (default: the
`.venv-vllm` that scripts/setup-vllm.sh makes, else this Python if it has vLLM). The engine loads the base
weights once and serves every sampling client's LoRA adapter by name with vLLM's native LoRA (vllm_engine/core.py;
nothing is merged, switching adapters reloads nothing). A sampling client on an adapter checks, when it is
created, that the engine can put LoRA on every module its LoraSpec adapts (`check_lora_targets`, callable before
training too); an architecture vLLM cannot serve stops the engine's start with the reason (VLLMUnavailableError).
Sampling, next-token scoring (the preference model's judgement) and `compute_logprobs` (vLLM's prompt logprobs)
run on the engine.
Settings: the vllm_* fields of EngineSettings (max LoRA rank, adapters per batch, KV cache, compile, CPU ops).
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rlhfkit.engine.model.lora import LoraSpec, target_module_names
from rlhfkit.engine.model.base import Precision, load_tokenizer, resolve_base_model
from rlhfkit.engine.sampling_api import SamplingAPI
from rlhfkit.engine.settings import EngineSettings
from rlhfkit.engine.types import ModelInput, NextTokenScores, SampleResponse, SamplingParams
from rlhfkit.engine.vllm_engine.core import UnsupportedAdapterError
from rlhfkit.engine.vllm_engine.inference import responses_from, sample_rows, sampling_limits
from rlhfkit.engine.vllm_engine.launch import (
    WORKER_MODULE,
    VLLMUnavailableError,
    engine_kwargs,
    package_path,
    vllm_environment,
    vllm_python,
)
from rlhfkit.paths import cache_dir


class VLLMEngine:
    """One vLLM worker process serving one base model and any LoRA adapters. Requests are serialised (one at a
    time)."""

    def __init__(self, model_dir: str, dtype: str, context: int, settings: EngineSettings, seed: int = 0):
        self.model_dir = model_dir
        folder = cache_dir() / "vllm"
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / f"worker-{os.getpid()}.log"
        self._lock = threading.Lock()
        address = str(Path(tempfile.mkdtemp(prefix="rlhfkit-vllm-")) / "socket")
        authkey = secrets.token_bytes(16)
        # the worker's environment has its own packages: this rlhfkit only, through a folder linking it
        env = {**vllm_environment(), **os.environ, "PYTHONPATH": package_path()}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [vllm_python(settings.vllm_python), "-m", WORKER_MODULE, address],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=Path(address).parent,
            )
        self.process.stdin.write(authkey.hex().encode() + b"\n")
        self.process.stdin.close()
        self.connection = self._connect(address, authkey)
        self.connection.send(
            {
                "model_dir": model_dir,
                "work_dir": tempfile.mkdtemp(prefix="engine-", dir=folder),
                "dtype": dtype,
                "max_model_len": context,
                "seed": seed,
                **engine_kwargs(settings),
            }
        )
        reply = self._receive(settings.vllm_start_timeout)
        if "error" in reply:
            raise VLLMUnavailableError(f"the vLLM worker failed to start: {reply['error']} (log: {self.log_path})")
        self.start_seconds = reply["ready"]
        self.adapters: set[str] = set()  # adapter ids loaded into this engine
        self.checked_targets: set[frozenset[str]] = set()  # LoRA target sets the engine can adapt
        atexit.register(self.close)

    def _connect(self, address: str, authkey: bytes):
        from multiprocessing.connection import Client

        deadline = time.time() + 120
        while True:
            if self.process.poll() is not None:
                raise VLLMUnavailableError(
                    f"the vLLM worker exited (code {self.process.returncode}); see {self.log_path}:\n{self._log_tail()}"
                )
            try:
                return Client(address, authkey=authkey)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.time() > deadline:
                    raise VLLMUnavailableError(
                        f"the vLLM worker did not listen within 120 s; see {self.log_path}"
                    ) from None
                time.sleep(0.2)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _receive(self, timeout: float | None = None) -> dict:
        while not self.connection.poll(1.0):
            if self.process.poll() is not None:
                raise VLLMUnavailableError(
                    f"the vLLM worker died (code {self.process.returncode}); see {self.log_path}:\n{self._log_tail()}"
                )
            if timeout is not None:
                timeout -= 1.0
                if timeout <= 0:
                    raise VLLMUnavailableError(f"the vLLM worker did not answer in time; see {self.log_path}")
        return self.connection.recv()

    def use_adapter(self, adapter_path: str | None) -> str | None:
        """The engine's id of the adapter saved at `adapter_path` (loaded on first use), None for the base
        model. The id names the folder and the time its weights were written: a folder saved again under the
        same name is a new adapter to vLLM (which caches adapters by id)."""
        if adapter_path is None:
            return None
        folder = Path(adapter_path)
        adapter_id = f"{folder}@{(folder / 'adapter_model.safetensors').stat().st_mtime_ns}"
        if adapter_id not in self.adapters:
            self.request({"op": "load_adapter", "adapter_id": adapter_id, "path": str(folder)})
            self.adapters.add(adapter_id)
        return adapter_id

    def check_targets(self, modules: set[str], where: str) -> None:
        """Raise UnsupportedAdapterError (naming the setting to change) unless the engine can put LoRA on every
        one of `modules` (leaf names such as q_proj, lm_head)."""
        if frozenset(modules) not in self.checked_targets:
            self.request({"op": "check_targets", "modules": set(modules), "where": where})
            self.checked_targets.add(frozenset(modules))

    def request(self, request: dict) -> Any:
        with self._lock:
            self.connection.send(request)
            reply = self._receive()
        if reply.get("error_type") == UnsupportedAdapterError.__name__:
            raise UnsupportedAdapterError(f"vLLM worker: {reply['error']}")
        if "error" in reply:
            raise RuntimeError(f"vLLM worker: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.connection.send({"op": "close"})
                self.process.wait(timeout=30)
            except Exception:
                self.process.kill()


_engines: dict[tuple[str, str, EngineSettings], VLLMEngine] = {}
_engines_lock = threading.Lock()


def engine_for(base_model: str, precision: Precision, context: int, settings: EngineSettings) -> VLLMEngine:
    """The vLLM worker of (model, dtype, settings) in this process, started on first use."""
    folder = resolve_base_model(base_model)
    dtype = str(precision.compute_dtype).removeprefix("torch.")
    with _engines_lock:
        key = (folder, dtype, settings)
        if key not in _engines or _engines[key].process.poll() is not None:
            _engines[key] = VLLMEngine(folder, dtype, context, settings)
        return _engines[key]


def close_engines() -> None:
    """Stop every vLLM worker this process started (they also stop when it exits)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.close()
        _engines.clear()


@functools.lru_cache(maxsize=64)
def lora_target_leaves(spec: LoraSpec) -> tuple[str, ...]:
    """The modules a training client with `spec` adapts (lora.target_module_names), found on the model's
    structure built on the meta device (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_base_model(spec.base_model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return tuple(target_module_names(model, spec))


def targets_description(spec: LoraSpec) -> str:
    return (
        f"LoRA targets of {spec.base_model} (train_mlp={spec.train_mlp}, train_attn={spec.train_attn}, "
        f"train_unembed={spec.train_unembed})"
    )


def check_lora_targets(spec: LoraSpec, precision: Precision, settings: EngineSettings | None = None) -> None:
    """Stop with UnsupportedAdapterError, naming the setting to change (train_unembed=False, train_attn=False,
    ... or sampler=local), when the vLLM engine for `spec.base_model` cannot put a LoRA adapter on a module that
    a training client with `spec` adapts: call it before training. Starts that engine (the one sampling uses);
    raises VLLMUnavailableError when vLLM cannot serve the architecture at all."""
    context = sampling_limits(resolve_base_model(spec.base_model))[1]
    engine_for(spec.base_model, precision, context, settings or EngineSettings()).check_targets(
        set(lora_target_leaves(spec)), targets_description(spec)
    )


class VLLMSamplingClient(SamplingAPI):
    """The SamplingAPI, generating and scoring with vLLM: a base model, or a base model with the LoRA adapter
    saved at `adapter_path` (a save_weights_for_sampler / save_state directory). With an adapter, its LoraSpec's
    targets are checked against the engine first (check_lora_targets). Each batch primitive is one request to
    the engine (sampling: one per 4 x settings.sampling_batch rows)."""

    def __init__(
        self,
        spec: LoraSpec | None,
        base_model: str,
        adapter_path: str | None,
        precision: Precision,
        settings: EngineSettings | None = None,
    ):
        super().__init__("rlhfkit-vllm-sampling")
        self.spec, self.base_model, self.adapter_path, self.precision = spec, base_model, adapter_path, precision
        self.settings = settings or EngineSettings()
        self.tokenizer = load_tokenizer(base_model)
        self._eos_ids, self._context = sampling_limits(resolve_base_model(base_model))
        self._engine: VLLMEngine | None = None  # started on the first request, or now to check an adapter's spec
        if spec is not None:
            self.engine.check_targets(set(lora_target_leaves(spec)), targets_description(spec))

    @property
    def engine(self) -> VLLMEngine:
        if self._engine is None or self._engine.process.poll() is not None:
            self._engine = engine_for(self.base_model, self.precision, self._context, self.settings)
        return self._engine

    def _sample_many(self, requests: list[tuple[ModelInput, int, SamplingParams]]) -> list[SampleResponse]:
        counts, rows = sample_rows(
            [(prompt.to_ints(), n, params) for prompt, n, params in requests], self._eos_ids, self._context
        )
        adapter_id = self.engine.use_adapter(self.adapter_path)
        results = []
        limit = self.settings.sampling_batch * 4  # vLLM schedules its own batches; this bounds one message
        for start in range(0, len(rows), limit):
            results += self.engine.request(
                {"op": "sample", "adapter_id": adapter_id, "rows": rows[start : start + limit]}
            )
        return responses_from(counts, results)

    def _score_many(self, prompts: list[ModelInput], candidates: list[int]) -> list[NextTokenScores]:
        adapter_id = self.engine.use_adapter(self.adapter_path)
        scores = self.engine.request(
            {
                "op": "score_next_token",
                "adapter_id": adapter_id,
                "prompts": [p.to_ints() for p in prompts],
                "candidates": list(candidates),
            }
        )
        return [NextTokenScores(argmax, logprobs) for argmax, logprobs in scores]

    def _logprobs_many(self, prompts: list[ModelInput]) -> list[list[float | None]]:
        adapter_id = self.engine.use_adapter(self.adapter_path)
        return self.engine.request(
            {"op": "compute_logprobs", "adapter_id": adapter_id, "prompts": [p.to_ints() for p in prompts]}
        )
