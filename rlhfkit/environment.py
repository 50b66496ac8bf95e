"""The process environment, read in one place: every RLHFKIT_* variable rlhfkit knows, what it sets, and the
only functions that read them.

Engine settings are one value (rlhfkit.engine.EngineSettings) passed down to the clients; the environment is
one of its sources, read at the command line or by `EngineSettings.from_env()` through `get` here, never below
`ServiceClient`. The other variables name folders (data, cache) or drive the fault-injection tests. A test
(tests/test_layers.py) checks that no other module of rlhfkit reads `os.environ` for an RLHFKIT_* name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# name -> what it sets (the engine's variables are EngineSettings fields: settings.ENV maps them)
VARIABLES = {
    "RLHFKIT_DATA_DIR": "the offline data folder (default ../shared/data beside the repository or the cwd)",
    "RLHFKIT_CACHE_DIR": "converted models, vLLM work folders, default storage (default ~/.cache/rlhfkit)",
    "RLHFKIT_FAULT_TRACE": "fault injection: append every fault point reached to this file (tests)",
    "RLHFKIT_FAULT_KILL_AT": "fault injection: SIGKILL the process at the fault point with this index (tests)",
    "RLHFKIT_BACKEND": "EngineSettings.backend",
    "RLHFKIT_SAMPLER": "EngineSettings.sampler",
    "RLHFKIT_INFERENCE_ENGINE": "EngineSettings.inference_engine",
    "RLHFKIT_DEVICE": "EngineSettings.device",
    "RLHFKIT_DTYPE": "EngineSettings.dtype",
    "RLHFKIT_RAY_ADDRESS": "EngineSettings.ray_address",
    "RLHFKIT_NUM_TRAIN_WORKERS": "EngineSettings.num_train_workers",
    "RLHFKIT_NUM_SAMPLERS": "EngineSettings.num_samplers",
    "RLHFKIT_SAMPLING_BATCH": "EngineSettings.sampling_batch",
    "RLHFKIT_SHARE_PREFIXES": "EngineSettings.share_prefixes",
    "RLHFKIT_FAST_PATHS": "EngineSettings.fast_paths",
    "RLHFKIT_MICROBATCH_TOKENS": "EngineSettings.microbatch_tokens",
    "RLHFKIT_VLLM_PYTHON": "EngineSettings.vllm_python",
    "RLHFKIT_VLLM_COMPILE": "EngineSettings.vllm_compile",
    "RLHFKIT_VLLM_KV_GB": "EngineSettings.vllm_kv_gb",
    "RLHFKIT_VLLM_MAX_LORAS": "EngineSettings.vllm_max_loras",
    "RLHFKIT_VLLM_MAX_LORA_RANK": "EngineSettings.vllm_max_lora_rank",
    "RLHFKIT_VLLM_CPU_OPS": "EngineSettings.vllm_cpu_ops",
    "RLHFKIT_VLLM_START_TIMEOUT": "EngineSettings.vllm_start_timeout",
}
PREFIX = "RLHFKIT_"
# variables of rlhfkit's libraries that change its results or speed (recorded with the run)
LIBRARY_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "PYTHONHASHSEED",
    "VLLM_CPU_KVCACHE_SPACE",
)
# what a Ray actor inherits from its driver (paths, the fault tests, the libraries' offline switches)
FORWARDED_PREFIXES = (PREFIX, "HF_", "OMP_NUM_THREADS", "TRANSFORMERS_", "TOKENIZERS_")


def get(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of the RLHFKIT_* variable `name` (None when unset or empty)."""
    if name not in VARIABLES:
        raise KeyError(f"{name}: not an rlhfkit environment variable (rlhfkit/environment.py lists them)")
    value = (os.environ if environ is None else environ).get(name)
    return value or None


def snapshot() -> dict[str, str]:
    """The variables that change rlhfkit's behaviour, as set now (environment.json of a run)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(PREFIX) or k in LIBRARY_VARIABLES}


def hub_offline(datasets: bool = False) -> bool:
    """Whether Hugging Face's offline switches are on: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE (models), and with
    `datasets` HF_HUB_OFFLINE or HF_DATASETS_OFFLINE (datasets), as those libraries read them."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in names)


def forwarded() -> dict[str, str]:
    """The variables a Ray actor gets from this process."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}
