"""EngineSettings: where and how the engine computes, as one frozen value passed down to the clients.

The `RLHFKIT_*` environment variables of the engine are read here (`EngineSettings.from_env()`), at the command
line, and nowhere below `ServiceClient`; `ServiceClient(settings=...)` takes the value, and the Tinker API server
(`rlhfkit serve`) is configured by one. No torch import: the settings are plain data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

BACKENDS = ("local", "ray")
SAMPLERS = ("local", "vllm")
INFERENCE_ENGINES = ("torch", "vllm")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")

# setting name -> environment variable (read only by from_env)
ENV = {
    "backend": "RLHFKIT_BACKEND",
    "sampler": "RLHFKIT_SAMPLER",
    "inference_engine": "RLHFKIT_INFERENCE_ENGINE",
    "device": "RLHFKIT_DEVICE",
    "dtype": "RLHFKIT_DTYPE",
    "ray_address": "RLHFKIT_RAY_ADDRESS",
    "num_train_workers": "RLHFKIT_NUM_TRAIN_WORKERS",
    "num_samplers": "RLHFKIT_NUM_SAMPLERS",
    "sampling_batch": "RLHFKIT_SAMPLING_BATCH",
    "share_prefixes": "RLHFKIT_SHARE_PREFIXES",
    "fast_paths": "RLHFKIT_FAST_PATHS",
    "microbatch_tokens": "RLHFKIT_MICROBATCH_TOKENS",
    "vllm_python": "RLHFKIT_VLLM_PYTHON",
    "vllm_compile": "RLHFKIT_VLLM_COMPILE",
    "vllm_kv_gb": "RLHFKIT_VLLM_KV_GB",
    "vllm_max_loras": "RLHFKIT_VLLM_MAX_LORAS",
    "vllm_max_lora_rank": "RLHFKIT_VLLM_MAX_LORA_RANK",
    "vllm_cpu_ops": "RLHFKIT_VLLM_CPU_OPS",
    "vllm_start_timeout": "RLHFKIT_VLLM_START_TIMEOUT",
}
VLLM_CPU_OPS = ("rlhfkit", "vllm")
POSITIVE_INTS = (
    "num_train_workers",
    "num_samplers",
    "sampling_batch",
    "microbatch_tokens",
    "vllm_kv_gb",
    "vllm_max_loras",
    "vllm_max_lora_rank",
)
BOOLS = ("share_prefixes", "fast_paths", "vllm_compile")


@dataclass(frozen=True)
class EngineSettings:
    """Where the engine runs. None means "the engine's default" (resolved by ServiceClient).

    backend: "local" (this process) or "ray" (a Ray cluster, docs/cluster.md).
    sampler: "local" (torch, in this process) or "vllm" (a vLLM engine in its own process); local backend only.
    inference_engine: "torch" or "vllm": the Ray backend's sampling actors (default: vllm when found, else torch).
    device: "cpu", "cuda", "cuda:1", ... (default: CUDA when available, else CPU).
    dtype: "auto" (bf16 where the hardware computes it natively, else fp32), "float32", "bfloat16", "float16".
    ray_address: None starts a private local Ray instance, "auto" joins a running cluster, or an address.
    num_train_workers: data-parallel training actors per training client (Ray backend).
    num_samplers: inference-engine actors per base model (Ray backend).

    Tuning of the torch engine (the defaults are the measured best; benchmarks/README.md):
    sampling_batch: rows generated together by the torch sampler (and the bound of one vLLM request message / 4).
    share_prefixes: scoring computes a prompt prefix shared by several sequences once.
    fast_paths: the torch sampler's preallocated KV cache and row selection on models whose cache allows them;
        False forces the general path (for measuring it).
    microbatch_tokens: padded tokens per forward pass (None: 512 when training on a CPU, else 4096).

    The vLLM engine (sampler=vllm or inference_engine=vllm):
    vllm_python: the Python of an environment with vLLM (None: .venv-vllm/bin/python, else this one if it has vLLM).
    vllm_compile: compile the model (about 80 s more at start, about 10% faster) instead of running eagerly.
    vllm_kv_gb: the KV cache in GiB.   vllm_max_loras: adapters in one batch.
    vllm_max_lora_rank: the highest LoRA rank served (a higher one is refused before training).
    vllm_cpu_ops: "rlhfkit" (batched LoRA ops on vLLM's CPU build, docs/patches.md) or "vllm" (its own).
    vllm_start_timeout: seconds a vLLM engine may take to start.
    """

    backend: str | None = None
    sampler: str | None = None
    inference_engine: str | None = None
    device: str | None = None
    dtype: str | None = None
    ray_address: str | None = None
    num_train_workers: int | None = None
    num_samplers: int | None = None
    sampling_batch: int = 64
    share_prefixes: bool = True
    fast_paths: bool = True
    microbatch_tokens: int | None = None
    vllm_python: str | None = None
    vllm_compile: bool = False
    vllm_kv_gb: int = 2
    vllm_max_loras: int = 4
    vllm_max_lora_rank: int = 64
    vllm_cpu_ops: str = "rlhfkit"
    vllm_start_timeout: float = 900.0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("backend", BACKENDS),
            ("sampler", SAMPLERS),
            ("inference_engine", INFERENCE_ENGINES),
            ("dtype", DTYPES),
            ("vllm_cpu_ops", VLLM_CPU_OPS),
        ):
            value = getattr(self, name)
            if value is not None and str(value).lower() not in allowed:
                raise ValueError(f"engine setting {name}={value!r}: expected one of {', '.join(allowed)}")
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"engine setting {name}={value!r}: expected a whole number of at least 1")
        for name in BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"engine setting {name}={getattr(self, name)!r}: expected true or false")
        if not isinstance(self.vllm_start_timeout, (int, float)) or self.vllm_start_timeout <= 0:
            raise ValueError(f"engine setting vllm_start_timeout={self.vllm_start_timeout!r}: expected seconds > 0")

    @staticmethod
    def from_env(environ: dict[str, str] | None = None, **overrides: Any) -> EngineSettings:
        """The settings given by the RLHFKIT_* environment variables, then `overrides` (None values ignored)."""
        from rlhfkit import environment

        values: dict[str, Any] = {}
        for name, variable in ENV.items():
            raw = environment.get(variable, environ)
            if raw:
                values[name] = _parse(name, raw, variable)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return EngineSettings(**values)

    @staticmethod
    def parse(name: str, text: str) -> Any:
        """The value of setting `name` written as text (a command line's key=value)."""
        return _parse(name, text, f"{name}={text}")

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(EngineSettings))

    def merged(self, **overrides: Any) -> EngineSettings:
        """These settings with the given (non-None) overrides."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def record(self) -> dict[str, Any]:
        """A JSON-able record (for environment.json and config.json)."""
        return asdict(self)


def _parse(name: str, raw: str, variable: str) -> Any:
    """A setting's value from its text (an environment variable's or a command line's key=value)."""
    if name in POSITIVE_INTS:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{variable}={raw!r}: expected a whole number") from None
    if name in BOOLS:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{variable}={raw!r}: expected 1/0 (true/false)")
    if name == "vllm_start_timeout":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{variable}={raw!r}: expected seconds") from None
    return raw


def resolve(engine: EngineSettings | None, **flat: Any) -> EngineSettings:
    """A loop config's engine: its `engine` value (None: the RLHFKIT_* environment, read here), with its flat
    compatibility fields (backend=..., ray_address=..., None ignored) on top."""
    return (engine if engine is not None else EngineSettings.from_env()).merged(**flat)


def with_engine(builder: Any, engine: EngineSettings) -> Any:
    """`builder` (a frozen dataclass that makes clients, e.g. a preference-model builder) with `engine` where it
    has an `engine` field left at None, also in the builders it holds; anything else unchanged. So a loop's
    judge and evaluators run where the loop does unless they were told otherwise."""
    import dataclasses

    if not dataclasses.is_dataclass(builder) or isinstance(builder, type):
        return builder
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(builder):
        value = getattr(builder, f.name)
        if f.name == "engine" and value is None:
            changes["engine"] = engine
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            replaced = with_engine(value, engine)
            if replaced is not value:
                changes[f.name] = replaced
    return dataclasses.replace(builder, **changes) if changes else builder
