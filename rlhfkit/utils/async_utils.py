"""Entry points that work both from plain scripts and from inside an event loop (as the tutorial awaits them)."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine


def run_or_await(coroutine: Coroutine) -> Any:
    """Outside an event loop, run the coroutine to completion and return its result; inside one, return the
    coroutine for the caller to await."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    return coroutine
