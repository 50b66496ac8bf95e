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

Within one client the heap still fragments: passes over rows of other lengths allocate tensors of other sizes, and
the free chunks between long-lived blocks stay resident (measured: 8-row training steps of random lengths
60-256, bf16 SmolLM2: resident memory after a step climbing from 1.23 to 2.30 GiB in 12 steps, 1.35 GiB after a
malloc_trim; in the full demo's preference-model stage, 41 such steps, the process reached 3.25 GiB). So the
trainer and the torch sampler call `trim_if_grown` after each request: a malloc_trim runs when resident memory
has grown by TRIM_GROWTH_BYTES since the last trim, which bounds what fragmentation keeps to about that much
(a trim, ~0.1-0.35 s, runs every few steps instead of after every pass).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time

_lock = threading.Lock()
_trim = None  # glibc's malloc_trim, False where there is none
_wanted = threading.Event()
_trimmer: threading.Thread | None = None
_shared_arena = False
_trimmed_at = 0  # resident bytes after the last trim_if_grown trim
TRIM_GROWTH_BYTES = 128 << 20
M_ARENA_MAX = -8  # glibc's malloc.h
try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    _PAGE = 4096
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
    client threads start. A MALLOC_ARENA_MAX set in the environment (glibc's own switch) is left to stand. Never
    raises."""
    global _shared_arena
    with _lock:
        if not _shared_arena:
            _shared_arena = True
            mallopt = _glibc("mallopt")
            if mallopt is not None and not os.environ.get("MALLOC_ARENA_MAX"):
                mallopt(M_ARENA_MAX, 1)


def trim_free_memory() -> None:
    """malloc_trim(0): free pages of every arena go back to the OS. Never raises."""
    global _trim
    with _lock:
        if _trim is None:
            _trim = _glibc("malloc_trim") or False
        if _trim:
            _trim(0)  # ctypes releases the GIL while it runs


def resident_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def trim_if_grown() -> None:
    """trim_free_memory, here and now, when resident memory has grown by TRIM_GROWTH_BYTES since the last such
    trim (the growth fragmentation leaves after a request). Cheap otherwise (one read of /proc/self/statm)."""
    global _trimmed_at
    now = resident_bytes()
    if now and now > _trimmed_at + TRIM_GROWTH_BYTES:
        trim_free_memory()
        _trimmed_at = resident_bytes()


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
