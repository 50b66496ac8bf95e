"""Starting `rlhfkit serve` as a subprocess on loopback for the tests (the real tinker SDK is the client)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
API_KEY = "tml-rlhfkit-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m rlhfkit serve` on 127.0.0.1, fp32, its output in `log`."""

    def __init__(self, storage: Path, *args: str, port: int | None = None, env: dict | None = None):
        self.storage, self.args = Path(storage), list(args)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.storage.parent / f"server-{self.port}.log"
        self.env = {**os.environ, "RLHFKIT_DTYPE": "float32", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.storage.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")  # noqa: SIM115 (kept open for the process's lifetime)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhfkit", "serve", "--port", str(self.port), "--storage", str(self.storage)]
            + self.args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rlhfkit serve exited ({self.proc.returncode}):\n{self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/v1/healthz", timeout=1, headers=self.headers()).status_code == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"rlhfkit serve did not answer in {timeout} s:\n{self.log.read_text()}")

    def headers(self) -> dict:
        key = next((a.split("=", 1)[1] for a in self.args if a.startswith("--api-key=")), None)
        return {"X-API-Key": key} if key else {}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def client_env(self) -> dict:
        """The environment a tinker program needs to use this server."""
        return {
            **os.environ,
            "TINKER_BASE_URL": self.url,
            "TINKER_API_KEY": API_KEY,
            "TINKER_TELEMETRY": "0",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "RLHFKIT_DTYPE": "float32",
        }
