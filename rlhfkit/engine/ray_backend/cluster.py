"""The Ray side of the engine: starting or joining a cluster, how actors are sized, futures of Ray calls.

`ray_address`: None starts a private local Ray instance (bound to 127.0.0.1, small object store, no
dashboard); "auto" joins the cluster this machine belongs to (`ray start`); any other value is passed to
`ray.init(address=...)` (a loopback address, e.g. a test cluster on 127.0.0.2, makes the driver's node address
loopback too). Actors get this package and the engine's settings through the runtime
environment (PYTHONPATH and the RLHFKIT_* / HF_* variables of the driver), so a cluster started from the
same checkout (or with rlhfkit installed on every node) runs them.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from pathlib import Path
from typing import Any, Callable

from rlhfkit import environment
from rlhfkit.engine.futures import APIFuture

PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # the private local instance's object store

_lock = threading.Lock()


class RayUnavailableError(RuntimeError):
    pass


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RayUnavailableError("backend=ray needs Ray: pip install -e '.[ray]' (or scripts/setup.sh)") from e
    return ray


def actor_env() -> dict[str, str]:
    """Environment variables every actor gets: this package on the path and the engine's settings."""
    env = environment.forwarded()
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = PACKAGE_ROOT if not path else f"{PACKAGE_ROOT}{os.pathsep}{path}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def connect(address: str | None) -> Any:
    """Start or join Ray once per process (see the module docstring); returns the ray module."""
    ray = import_ray()
    with _lock:
        if ray.is_initialized():
            return ray
        runtime_env = {"env_vars": actor_env()}
        if address is None:
            ray.init(
                address="local",
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                _node_ip_address="127.0.0.1",
                runtime_env=runtime_env,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            host = address.rsplit(":", 1)[0]
            local = {"_node_ip_address": host} if host.startswith("127.") else {}  # a cluster on loopback
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False, **local)
    return ray


def cluster_gpus() -> int:
    ray = import_ray()
    return int(ray.cluster_resources().get("GPU", 0))


def actor_resources(num_actors: int) -> dict[str, float]:
    """Resources of each of `num_actors` engine actors (all training workers and inference engines of a run):
    one GPU each when the cluster has that many, an equal share of the GPUs when it has fewer (a training
    worker and an inference engine then share a device), else a small CPU share (Ray does not pin CPUs; a share
    lets a one-CPU node hold a training worker and an inference engine)."""
    gpus = cluster_gpus()
    if gpus > 0:
        return {"num_cpus": 1, "num_gpus": min(1.0, gpus / max(num_actors, 1))}
    return {"num_cpus": 0.25}


def default_num_train_workers() -> int:
    """One per GPU the cluster offers, else 1."""
    return max(cluster_gpus(), 1)


def gather(
    refs: list[Any],
    combine: Callable[[list[Any]], Any],
    translate_error: Callable[[BaseException], BaseException] = lambda e: e,
) -> APIFuture:
    """A future completed with `combine(results)` once every Ray call in `refs` has finished (or with the first
    error, passed through `translate_error`)."""
    ray = import_ray()
    future: concurrent.futures.Future = concurrent.futures.Future()

    def wait() -> None:
        try:
            future.set_result(combine(ray.get(refs)))
        except BaseException as e:  # handed to the caller's .result()
            future.set_exception(translate_error(e))

    threading.Thread(target=wait, name="rlhfkit-ray-gather", daemon=True).start()
    return APIFuture(future)
