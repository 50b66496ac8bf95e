"""EngineSettings: where and how the engine computes, as one frozen value passed down to the clients.

The `RLHFKIT_*` environment variables of the engine are read here (`EngineSettings.from_env()`), at the command
line, and nowhere below `ServiceClient`; `ServiceClient(settings=...)` takes the value, and the Tinker API server
(`rlhfkit serve`) is configured by one. No torch import: the settings are plain data.
"""

from __future__ import annotations

import os
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
}


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
    """

    backend: str | None = None
    sampler: str | None = None
    inference_engine: str | None = None
    device: str | None = None
    dtype: str | None = None
    ray_address: str | None = None
    num_train_workers: int | None = None
    num_samplers: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("backend", BACKENDS),
            ("sampler", SAMPLERS),
            ("inference_engine", INFERENCE_ENGINES),
            ("dtype", DTYPES),
        ):
            value = getattr(self, name)
            if value is not None and str(value).lower() not in allowed:
                raise ValueError(f"engine setting {name}={value!r}: expected one of {', '.join(allowed)}")
        for name in ("num_train_workers", "num_samplers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"engine setting {name}={value!r}: expected a whole number of at least 1")

    @staticmethod
    def from_env(environ: dict[str, str] | None = None, **overrides: Any) -> EngineSettings:
        """The settings given by the RLHFKIT_* environment variables, then `overrides` (None values ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in ENV.items():
            raw = environ.get(variable)
            if raw:
                values[name] = _parse(name, raw, variable)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return EngineSettings(**values)

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
    if name in ("num_train_workers", "num_samplers"):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{variable}={raw!r}: expected a whole number") from None
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
