"""Fault injection for the kill-anywhere tests (tests/test_faults.py).

`fault_point(label)` marks a moment where a kill is worth testing (inside a checkpoint write, a metrics
append, an optimizer step, ...). Two environment variables drive it, both read at each point:

    RLHFKIT_FAULT_TRACE=FILE   append "<index> <phase> <label>" to FILE for every point reached
    RLHFKIT_FAULT_KILL_AT=N    SIGKILL this process at the point with index N

Points are counted on the main thread and on the engine's request threads (named "rlhfkit-...": they run one
request at a time for a caller that waits on it), never on free-running background threads (a timer's ticks
must not shift the indices), so a deterministic run reaches the same indices every time. Without either
variable a point does nothing.
"""

from __future__ import annotations

import os
import signal
import threading

from rlhfkit import environment

TRACE_ENV = "RLHFKIT_FAULT_TRACE"
KILL_ENV = "RLHFKIT_FAULT_KILL_AT"

_state = {"count": 0, "phase": "start"}


def set_phase(name: str) -> None:
    """Name the part of the run that follows (a pipeline stage, the report), for the trace."""
    _state["phase"] = name


def fault_point(label: str) -> None:
    trace, kill_at = environment.get(TRACE_ENV), environment.get(KILL_ENV)
    if trace is None and kill_at is None:
        return
    thread = threading.current_thread()
    if thread is not threading.main_thread() and not thread.name.startswith("rlhfkit-"):
        return
    index = _state["count"]
    _state["count"] += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{index} {_state['phase']} {label}\n")
    if kill_at is not None and index == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
