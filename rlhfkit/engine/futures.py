"""Futures returned by the `_async` client methods (awaitable, or `.result()` / `await .result_async()`)."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

T = TypeVar("T")


class APIFuture(Generic[T]):
    """A request result. The local backend runs requests in submission order, so it is always complete."""

    def __init__(self, value: T):
        self._value = value

    def result(self, timeout: float | None = None) -> T:
        return self._value

    async def result_async(self, timeout: float | None = None) -> T:
        return self._value

    def __await__(self) -> Any:
        async def _get() -> T:
            return self._value

        return _get().__await__()
