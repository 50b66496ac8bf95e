"""The vLLM side of the local vLLM sampling backend: a module run by the Python of an environment that has vLLM.

vLLM pins its own transformers, so it usually lives in its own environment (scripts/setup-vllm.sh). The rlhfkit
process (rlhfkit/engine/local_backend/vllm_client.py) starts it as

    VLLM_PYTHON -m rlhfkit.engine.vllm_engine.worker ADDRESS      (PYTHONPATH: launch.package_path())

listens on ADDRESS (a Unix socket) for one multiprocessing connection, whose authentication key comes on stdin,
and answers requests (plain dicts) on it. The engine is core.VLLMCore (like all of vllm_engine/, it imports only
what the vLLM environment has): one set of base weights, adapters served by name with native LoRA.
Requests: {"op": "load_adapter" | "check_targets" | "sample" | "score_next_token" | "compute_logprobs" | "health",
**arguments of that VLLMCore method}; replies: {"result": ...} or {"error": text, "error_type": the exception's class name}.
"""

from __future__ import annotations

import os
import sys
import time

OPERATIONS = ("load_adapter", "check_targets", "sample", "score_next_token", "compute_logprobs", "health")


def main() -> None:
    from multiprocessing.connection import Listener

    from rlhfkit.engine.vllm_engine.core import VLLMCore

    address = sys.argv[-1]
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    with Listener(address, authkey=authkey) as listener:
        connection = listener.accept()
    settings = connection.recv()
    started = time.time()
    try:
        core = VLLMCore(**settings)
    except BaseException as e:  # tell the client why, then stop
        connection.send({"error": f"{type(e).__name__}: {e}"})
        raise
    connection.send({"ready": time.time() - started})
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        op = request.pop("op", None)
        if op == "close":
            return
        try:
            if op not in OPERATIONS:
                raise ValueError(f"unknown request {op!r}")
            connection.send({"result": getattr(core, op)(**request)})
        except Exception as e:
            connection.send({"error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__})


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: faster on a few cores
    main()
