"""The vLLM side of the local vLLM sampling backend: a script run by the Python of an environment that has vLLM.

vLLM pins its own transformers, so it usually lives in its own environment (scripts/setup-vllm.sh). The rlhfkit
process (rlhfkit/engine/vllm_sampling.py) starts it as

    VLLM_PYTHON vllm_worker.py ADDRESS

listens on ADDRESS (a Unix socket) for one multiprocessing connection, whose authentication key comes on stdin,
and answers requests (plain dicts) on it. The engine is vllm_core.VLLMCore (loaded from this folder by path, so
nothing else of rlhfkit is imported): one set of base weights, adapters served by name with native LoRA.
Requests: {"op": "load_adapter" | "check_targets" | "sample" | "score_next_token" | "compute_logprobs" | "health",
**arguments of that VLLMCore method}; replies: {"result": ...} or {"error": text, "error_type": the exception's class name}.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

OPERATIONS = ("load_adapter", "check_targets", "sample", "score_next_token", "compute_logprobs", "health")


def load_core():
    spec = importlib.util.spec_from_file_location("rlhfkit_vllm_core", Path(__file__).with_name("vllm_core.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    from multiprocessing.connection import Listener

    address = sys.argv[-1]
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    with Listener(address, authkey=authkey) as listener:
        connection = listener.accept()
    settings = connection.recv()
    started = time.time()
    try:
        core = load_core().VLLMCore(**settings)
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
