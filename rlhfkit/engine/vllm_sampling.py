"""The vLLM sampling backend: generation by a vLLM engine in a separate process (optional; see README).

`ServiceClient(sampler="vllm")` (or RLHFKIT_SAMPLER=vllm) makes every sampling client generate through one
vLLM engine per base model, started on first use with the Python named by RLHFKIT_VLLM_PYTHON (default: the
`.venv-vllm` that scripts/setup-vllm.sh makes, else this Python if it has vLLM). The engine keeps one set of
weights: a sampling client's LoRA adapter is merged into them when that client samples (vllm_worker.py).
Scoring (`compute_logprobs`, `score_next_token*`) stays on the local backend, which computes only the
positions it needs; the local model is built the first time a client scores.
"""

from __future__ import annotations

import atexit
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from rlhfkit.engine.futures import APIFuture, RequestBatcher, RequestQueue
from rlhfkit.engine.lora import LoraSpec, load_adapter_tensors
from rlhfkit.engine.models import Precision, load_tokenizer, resolve_base_model
from rlhfkit.engine.sampling import SamplingClient, find_eos_ids, make_rows, max_sampling_batch
from rlhfkit.engine.types import ModelInput, NextTokenScores, SampledSequence, SampleResponse, SamplingParams
from rlhfkit.paths import cache_dir

WORKER_SCRIPT = Path(__file__).with_name("vllm_worker.py")
REPO_VENV_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
START_TIMEOUT = float(os.environ.get("RLHFKIT_VLLM_START_TIMEOUT", "900"))


class VLLMUnavailableError(RuntimeError):
    pass


def vllm_python() -> str:
    """The Python that runs the vLLM worker: $RLHFKIT_VLLM_PYTHON, else .venv-vllm/bin/python, else this one if
    it can import vllm."""
    configured = os.environ.get("RLHFKIT_VLLM_PYTHON")
    if configured:
        return configured
    if REPO_VENV_PYTHON.exists():
        return str(REPO_VENV_PYTHON)
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise VLLMUnavailableError("sampler=vllm: no Python with vLLM found. Run scripts/setup-vllm.sh (makes "
                               ".venv-vllm), or set RLHFKIT_VLLM_PYTHON to a Python that has vLLM")


def _cpu_bind() -> str:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return ",".join(str(c) for c in cpus) if cpus != list(range(cpus[0], cpus[-1] + 1)) else f"{cpus[0]}-{cpus[-1]}"


class VLLMEngine:
    """One vLLM worker process serving one base model. Requests are serialised (one at a time)."""

    def __init__(self, model_dir: str, dtype: str, context: int, seed: int = 0):
        self.model_dir = model_dir
        folder = cache_dir() / "vllm"
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / f"worker-{os.getpid()}.log"
        self._lock = threading.Lock()
        address = str(Path(tempfile.mkdtemp(prefix="rlhfkit-vllm-")) / "socket")
        authkey = secrets.token_bytes(16)
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_bind())
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.pop("PYTHONPATH", None)  # the worker's environment has its own packages
        with open(self.log_path, "ab") as log:
            # run_path, not `python vllm_worker.py`: the script's folder first on sys.path would let this
            # package's types.py shadow the standard library's
            launcher = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
            self.process = subprocess.Popen([vllm_python(), "-c", launcher, str(WORKER_SCRIPT), address],
                                            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=Path(address).parent)
        self.process.stdin.write(authkey.hex().encode() + b"\n")
        self.process.stdin.close()
        self.connection = self._connect(address, authkey)
        enforce_eager = os.environ.get("RLHFKIT_VLLM_COMPILE", "0") != "1"  # compiling: ~80 s start, ~10% faster
        self.connection.send({"model_dir": model_dir, "cache_dir": str(folder), "dtype": dtype,
                              "max_model_len": context, "seed": seed, "enforce_eager": enforce_eager,
                              "kv_cache_gb": int(os.environ.get("RLHFKIT_VLLM_KV_GB", "2"))})
        reply = self._receive(START_TIMEOUT)
        if "error" in reply:
            raise VLLMUnavailableError(f"the vLLM worker failed to start: {reply['error']} (log: {self.log_path})")
        self.start_seconds = reply["ready"]
        atexit.register(self.close)

    def _connect(self, address: str, authkey: bytes):
        from multiprocessing.connection import Client

        deadline = time.time() + 120
        while True:
            if self.process.poll() is not None:
                raise VLLMUnavailableError(f"the vLLM worker exited (code {self.process.returncode}); "
                                           f"see {self.log_path}:\n{self._log_tail()}")
            try:
                return Client(address, authkey=authkey)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.time() > deadline:
                    raise VLLMUnavailableError(f"the vLLM worker did not listen within 120 s; see {self.log_path}")
                time.sleep(0.2)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _receive(self, timeout: float | None = None) -> dict:
        while not self.connection.poll(1.0):
            if self.process.poll() is not None:
                raise VLLMUnavailableError(f"the vLLM worker died (code {self.process.returncode}); see "
                                           f"{self.log_path}:\n{self._log_tail()}")
            if timeout is not None:
                timeout -= 1.0
                if timeout <= 0:
                    raise VLLMUnavailableError(f"the vLLM worker did not answer in time; see {self.log_path}")
        return self.connection.recv()

    def request(self, request: dict) -> Any:
        with self._lock:
            self.connection.send(request)
            reply = self._receive()
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


_engines: dict[tuple[str, str], VLLMEngine] = {}
_engines_lock = threading.Lock()


def engine_for(base_model: str, precision: Precision, context: int) -> VLLMEngine:
    folder = resolve_base_model(base_model)
    dtype = str(precision.compute_dtype).removeprefix("torch.")
    with _engines_lock:
        key = (folder, dtype)
        if key not in _engines or _engines[key].process.poll() is not None:
            _engines[key] = VLLMEngine(folder, dtype, context)
        return _engines[key]


def close_engines() -> None:
    """Stop every vLLM worker this process started (they also stop when it exits)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.close()
        _engines.clear()


class VLLMSamplingClient:
    """The SamplingClient interface, generating with vLLM: a base model, or a base model with the LoRA adapter
    saved at `adapter_path` (a save_weights_for_sampler / save_state directory)."""

    def __init__(self, spec: LoraSpec | None, base_model: str, adapter_path: str | None, precision: Precision):
        self.spec, self.base_model, self.adapter_path, self.precision = spec, base_model, adapter_path, precision
        self.tokenizer = load_tokenizer(base_model)
        config = _model_config(base_model)
        self._context = min(int(getattr(config, "max_position_embeddings", 4096) or 4096), 8192)
        self._eos_ids = find_eos_ids(self.tokenizer, getattr(_generation_config(base_model), "eos_token_id", None))
        self._engine: VLLMEngine | None = None  # started on the first sample (scoring alone needs none)
        self._queue = RequestQueue("rlhfkit-vllm-sampling")
        self._sample_batcher = RequestBatcher(self._sample_many, self._queue)
        self._local_client: SamplingClient | None = None

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def engine(self) -> VLLMEngine:
        if self._engine is None:
            self._engine = engine_for(self.base_model, self.precision, self._context)
        return self._engine

    def _sample_many(self, requests: list[tuple[ModelInput, int, SamplingParams]]) -> list[SampleResponse]:
        per_request = [make_rows(prompt, n, params or SamplingParams(), self._eos_ids, self._context)
                       for prompt, n, params in requests]
        rows = [row for group in per_request for row in group]
        payload = [{"prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": r.temperature,
                    "top_p": r.top_p, "top_k": r.top_k if r.top_k > 0 else 0, "seed": r.seed,
                    "stop_strings": r.stop_strings, "stop_ids": sorted(r.stop_ids)} for r in rows]
        results = []
        limit = max(max_sampling_batch(), 1) * 4  # vLLM schedules its own batches; this bounds one message
        for start in range(0, len(payload), limit):
            results += self.engine.request({"op": "sample", "adapter": self.adapter_path,
                                            "scale": self.spec.scale if self.spec else 1.0,
                                            "rows": payload[start:start + limit]})
        out, k = [], 0
        for group in per_request:
            sequences = [SampledSequence(r["tokens"], r["logprobs"], r["stop_reason"])
                         for r in results[k:k + len(group)]]
            out.append(SampleResponse(sequences))
            k += len(group)
        return out

    def sample(self, prompt: ModelInput, num_samples: int = 1, sampling_params: SamplingParams | None = None
               ) -> APIFuture[SampleResponse]:
        return self._queue.submit(lambda: self._sample_many([(prompt, num_samples, sampling_params)])[0])

    async def sample_async(self, prompt: ModelInput, num_samples: int = 1,
                           sampling_params: SamplingParams | None = None) -> SampleResponse:
        return await self._sample_batcher.submit((prompt, num_samples, sampling_params))

    # Scoring runs on the local backend (only the needed positions are unembedded there).

    def local_client(self) -> SamplingClient:
        if self._local_client is None:
            if self.adapter_path is None or self.spec is None:
                self._local_client = SamplingClient.from_base(self.base_model, self.precision)
            else:
                self._local_client = SamplingClient.from_adapter(self.spec, load_adapter_tensors(self.adapter_path),
                                                                 self.precision)
        return self._local_client

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        return self.local_client().compute_logprobs(prompt)

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        return await self.local_client().compute_logprobs_async(prompt)

    def score_next_token_batch(self, prompts: Sequence[ModelInput], candidate_tokens: Sequence[int]
                               ) -> list[NextTokenScores]:
        return self.local_client().score_next_token_batch(prompts, candidate_tokens)

    def score_next_token(self, prompt: ModelInput, candidate_tokens: Sequence[int]) -> APIFuture[NextTokenScores]:
        return self.local_client().score_next_token(prompt, candidate_tokens)

    async def score_next_token_async(self, prompt: ModelInput, candidate_tokens: Sequence[int]) -> NextTokenScores:
        return await self.local_client().score_next_token_async(prompt, candidate_tokens)


def _model_config(base_model: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_base_model(base_model))


def _generation_config(base_model: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(resolve_base_model(base_model))
    except OSError:
        return None
