"""ServerSettings: everything `rlhfkit serve` and `create_app` are configured by, checked at construction."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.engine.settings import EngineSettings

LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo")


@dataclass(frozen=True)
class ServerSettings:
    """storage: the folder of training runs and checkpoints (tinker:// paths resolve under it; a restarted
    server on the same folder serves them again).
    host, port: where to listen; loopback by default. Any other host needs `api_key`.
    api_key: when set, every request must carry it (`X-API-Key`, the SDK's TINKER_API_KEY); when None, any key
    is accepted (the SDK still needs one that starts with "tml-").
    engine: where and how the engine computes (backend=ray, device, dtype, ...).
    session_timeout_s: a session without a heartbeat for this long is released (the SDK beats every 10 s).
    max_body_mb: the largest request body accepted (the SDK sends forward_backward in chunks of at most 5 MB).
    poll_timeout_s: how long one retrieve_future waits before answering 408 "poll again" (the SDK waits 45 s).
    gap_timeout_s: how long a training request waits for a missing earlier seq_id before running anyway.
    zstd: tell the SDK to compress forward_backward bodies with zstd (decompressed here either way).
    """

    storage: str = "~/.cache/rlhfkit/serve"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    engine: EngineSettings = field(default_factory=EngineSettings)
    session_timeout_s: float = 120.0
    max_body_mb: float = 64.0
    poll_timeout_s: float = 30.0
    gap_timeout_s: float = 5.0
    zstd: bool = False
    losses: tuple[str, ...] = LOSSES

    def __post_init__(self) -> None:
        if not _is_loopback(self.host) and not self.api_key:
            raise ValueError(
                f"--host {self.host}: a server reachable from other machines needs --api-key KEY "
                f"(every request must then carry it); without one, listen on 127.0.0.1"
            )
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("--api-key: use at least 8 characters")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port}: expected 1 to 65535")
        for name in ("session_timeout_s", "max_body_mb", "poll_timeout_s", "gap_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive number")
        if self.poll_timeout_s >= 45:
            raise ValueError(f"poll_timeout_s={self.poll_timeout_s}: must stay below the SDK's 45 s poll timeout")
        unknown = set(self.losses) - set(LOSSES)
        if unknown:
            raise ValueError(f"losses {sorted(unknown)}: the engine has {', '.join(LOSSES)}")
        object.__setattr__(self, "storage", str(Path(self.storage).expanduser()))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
