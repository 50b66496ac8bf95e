"""Futures of the server: every training and sampling POST answers `{"request_id"}` at once; the result is
fetched by `retrieve_future`, which long-polls (the SDK's poll times out after 45 s, so a wait ends before that
with HTTP 408, which the SDK answers by polling again at once).

All methods run on the server's event loop. Results are kept in memory until a while after they were last
asked for: a future does not survive a server restart (the SDK then gets a 404), the checkpoints do.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.serve.errors import NotFound, categorize


@dataclass
class Result:
    kind: str  # "json" | "proto" | "error"
    payload: Any  # dict | bytes | (category, message)


@dataclass
class _Entry:
    kind: str  # the request type, for logs
    created: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: Result | None = None
    finished: float | None = None


class FutureStore:
    def __init__(self, keep_s: float = 1800.0):
        self._entries: dict[str, _Entry] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{int(time.time()):x}"
        self.keep_s = keep_s

    def create(self, kind: str) -> str:
        self._evict()
        request_id = f"req-{self._prefix}-{next(self._ids)}"
        self._entries[request_id] = _Entry(kind)
        return request_id

    def resolve(self, request_id: str, result: Result) -> None:
        entry = self._entries.get(request_id)
        if entry is None or entry.result is not None:
            return
        entry.result, entry.finished = result, time.monotonic()
        entry.done.set()

    def fail(self, request_id: str, error: BaseException) -> None:
        self.resolve(request_id, Result("error", categorize(error)))

    def track(self, request_id: str, awaitable: Any, convert: Any) -> asyncio.Task:
        """Resolve the future with `convert(await awaitable)` (or the error it raises)."""

        async def run() -> None:
            try:
                self.resolve(request_id, convert(await awaitable))
            except Exception as e:  # handed to the client as the request's error
                self.fail(request_id, e)

        return asyncio.get_running_loop().create_task(run())

    async def wait(self, request_id: str, timeout: float) -> Result | None:
        entry = self._entries.get(request_id)
        if entry is None:
            raise NotFound(f"request_id {request_id!r} is unknown to this server (a restarted server forgets futures)")
        if entry.result is None:
            try:
                await asyncio.wait_for(entry.done.wait(), timeout)
            except TimeoutError:
                return None
        entry.finished = time.monotonic()  # kept a while after each read (a client may poll again)
        return entry.result

    def pending(self) -> int:
        return sum(1 for e in self._entries.values() if e.result is None)

    def _evict(self) -> None:
        if len(self._entries) < 512:
            return
        now = time.monotonic()
        for key in [k for k, e in self._entries.items() if e.finished is not None and now - e.finished > self.keep_s]:
            del self._entries[key]
