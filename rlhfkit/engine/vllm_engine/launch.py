"""Starting the vLLM side: which Python has vLLM, the environment of its processes, and the Ray actor options.

vLLM pins a transformers older than rlhfkit's, so it usually lives in its own environment (scripts/setup-vllm.sh).
Its processes import this rlhfkit package through PYTHONPATH set to `package_path()` (a folder holding only a
link to the package: its parent may be a site-packages whose transformers would shadow vLLM's):
  * the local `sampler=vllm` backend runs `VLLM_PYTHON -m rlhfkit.engine.vllm_engine.worker ADDRESS`;
  * the Ray backend starts `inference.VLLMInferenceWorker` as an actor with Ray's runtime_env
    {"py_executable": that Python} (the same Ray version is installed there by scripts/setup-vllm.sh).
Standard library only at module level (this runs on both sides).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhfkit.engine.settings import EngineSettings

REPO_VENV_PYTHON = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
WORKER_MODULE = "rlhfkit.engine.vllm_engine.worker"


class VLLMUnavailableError(RuntimeError):
    pass


def vllm_python(configured: str | None = None) -> str:
    """The Python that runs the vLLM side: `configured` (EngineSettings.vllm_python), else .venv-vllm/bin/python,
    else this one if it can import vllm."""
    if configured:
        return configured
    if REPO_VENV_PYTHON.exists():
        return str(REPO_VENV_PYTHON)
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise VLLMUnavailableError(
        "sampler=vllm: no Python with vLLM found. Run scripts/setup-vllm.sh (makes "
        ".venv-vllm), or set the engine setting vllm_python (RLHFKIT_VLLM_PYTHON) to a Python that has vLLM"
    )


def engine_kwargs(settings: EngineSettings) -> dict[str, Any]:
    """The vLLM engine's arguments (core.VLLMCore's, inference.VLLMInferenceWorker's) from the engine settings."""
    return {
        "enforce_eager": not settings.vllm_compile,
        "kv_cache_gb": settings.vllm_kv_gb,
        "max_loras": settings.vllm_max_loras,
        "max_lora_rank": settings.vllm_max_lora_rank,
        "cpu_ops": settings.vllm_cpu_ops,
    }


def vllm_environment(cpus: str | None = None) -> dict[str, str]:
    """Environment variables of a vLLM engine process on CPU: in-process engine core (faster on a few cores),
    OpenMP threads bound to `cpus` (default: the CPUs this process may use), no Hub access."""
    if cpus is None:
        allowed = (
            sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        )
        contiguous = allowed == list(range(allowed[0], allowed[-1] + 1))
        cpus = f"{allowed[0]}-{allowed[-1]}" if contiguous else ",".join(map(str, allowed))
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": cpus,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def package_path() -> str:
    """A folder holding only a link to this rlhfkit package: the PYTHONPATH of a process in another
    environment (the package's own parent may be a site-packages whose transformers would shadow vLLM's)."""
    import rlhfkit
    from rlhfkit.paths import cache_dir

    folder = cache_dir() / "vllm" / "pythonpath"
    folder.mkdir(parents=True, exist_ok=True)
    link, target = folder / "rlhfkit", Path(rlhfkit.__file__).resolve().parent
    if not link.is_symlink() or link.resolve() != target:
        tmp = folder / f".rlhfkit.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)
    return str(folder)


def vllm_actor(
    model_dir: str,
    work_dir: str,
    *,
    python: str | None = None,
    num_cpus: float = 1,
    cpus: str | None = None,
    max_restarts: int = 3,
    name: str | None = None,
    **settings: Any,
):
    """Start a VLLMInferenceWorker as a Ray actor in the vLLM environment's Python (`python`, default
    vllm_python()) with Ray's runtime_env py_executable; it imports this rlhfkit through PYTHONPATH (see
    package_path). Needs ray.init() first. `settings` go to VLLMInferenceWorker (dtype, max_loras, ...)."""
    import ray

    from rlhfkit.engine.vllm_engine.inference import VLLMInferenceWorker

    actor = ray.remote(VLLMInferenceWorker).options(
        **ray_actor_options(python, cpus), num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0, name=name
    )
    return actor.remote(model_dir, work_dir, **settings)


def ray_actor_options(python: str | None = None, cpus: str | None = None) -> dict[str, Any]:
    """The Ray actor options that run a VLLMInferenceWorker in the vLLM environment's Python (`python`, default
    vllm_python()): Ray's runtime_env py_executable, the vLLM process environment (vllm_environment(cpus)) and
    PYTHONPATH = package_path()."""
    return {
        "runtime_env": {
            "py_executable": python or vllm_python(),
            "env_vars": {**vllm_environment(cpus), "PYTHONPATH": package_path()},
        }
    }
