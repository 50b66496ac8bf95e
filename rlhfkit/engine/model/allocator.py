"""Handing the C allocator's free memory back to the operating system when an engine client is freed.

On Linux, glibc's malloc keeps freed memory for reuse, in one arena per thread that allocated it. Each engine
client computes on a thread of its own, so without this, the memory a finished client used for its activations
stayed resident after the client was gone: in the demo's pipeline every stage's peak was kept beside the next
one's (measured: 2.4 GiB resident after a 3-step SFT stage whose clients were all freed, 0.8 GiB after
malloc_trim). So glibc's malloc_trim(0) runs on a background thread a second after a training or sampling client
is garbage collected (`trim_soon`: stage ends, the RL loop's sampler of the previous iteration). It is not run
after every request: it took ~0.35 s on a 2 GiB heap, and the memory it returns is faulted in again by the next
pass. Elsewhere (macOS, musl) it does nothing.

A trim returns only what is free at that moment, and within a stage several client threads are alive at once (the
RL loop: the policy's trainer, its sampler of the iteration, the preference model's, the KL reference's): each had
an arena of its own, and each arena kept the high-water mark of that client's passes, so the process held the
sum of the clients' peaks (measured on the shortened demo: resident memory climbing from 2.4 to 3.66 GiB through
the RL stage as its clients' threads started). `share_one_arena` (mallopt M_ARENA_MAX = 1, before the engine
starts its client threads) makes every thread allocate from glibc's main arena: what one client frees is reused
by the next one's pass, so the process holds about the largest pass's peak instead. The clients of one process
compute one request at a time in the recipes, so the shared arena's lock is rarely contended.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
import time

_lock = threading.Lock()
_trim = None  # glibc's malloc_trim, False where there is none
_wanted = threading.Event()
_trimmer: threading.Thread | None = None
_shared_arena = False
M_ARENA_MAX = -8  # glibc's malloc.h
TRIM_DELAY_S = (
    1.0  # after a client's finalizer: by then its tensors, and what its exiting worker thread held, are freed
)


def _glibc(name: str):
    """A function of glibc, or None (not Linux, not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None


def share_one_arena() -> None:
    """mallopt(M_ARENA_MAX, 1), once per process: threads started from now on allocate from glibc's main arena
    (those that already have an arena keep it). Called when the engine makes a service or a client, before its
    client threads start. Never raises."""
    global _shared_arena
    with _lock:
        if not _shared_arena:
            _shared_arena = True
            mallopt = _glibc("mallopt")
            if mallopt is not None:
                mallopt(M_ARENA_MAX, 1)


def trim_free_memory() -> None:
    """malloc_trim(0): free pages of every arena go back to the OS. Never raises."""
    global _trim
    with _lock:
        if _trim is None:
            _trim = _glibc("malloc_trim") or False
        if _trim:
            _trim(0)  # ctypes releases the GIL while it runs


def trim_soon() -> None:
    """Ask for trim_free_memory on a background thread shortly (a finalizer runs before the object's own
    tensors are freed; requests close together make one trim). Returns at once."""
    global _trimmer
    _wanted.set()
    with _lock:
        if _trimmer is None:
            _trimmer = threading.Thread(target=_trim_loop, name="rlhfkit-trim", daemon=True)
            _trimmer.start()


def _trim_loop() -> None:
    while True:
        _wanted.wait()
        time.sleep(TRIM_DELAY_S)
        _wanted.clear()
        trim_free_memory()
