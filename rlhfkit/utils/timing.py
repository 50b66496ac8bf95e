"""Wall-time measurement: `Timer` (time/<name> metrics of a training step) and `StageClock` (a pipeline stage's
wall time, kept in a JSON file across resumed runs)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from rlhfkit.errors import UserError
from rlhfkit.utils.atomic import write_json_atomic


class Timer:
    """Wall time per named span, summed, as {"time/<name>": seconds}; `times` also has time/total once
    `total()` is called."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start

    def total(self) -> dict[str, float]:
        """The spans and time/total (since the timer was made)."""
        return {**self.times, "time/total": time.perf_counter() - self.start}


class StageClock:
    """Adds a stage's wall time to a JSON file of {stage: seconds}, summed over resumed runs. A thread rewrites
    the file every `every` seconds while the stage runs, so a killed run's time is counted too (to within
    `every`); a write that fails there (a full disk) stops the thread quietly and is reported by the stage."""

    def __init__(self, path: Path, timings: dict[str, float], name: str, every: float = 10.0):
        self.path, self.timings, self.name, self.every = path, timings, name, every
        self.before = timings.get(name, 0.0)
        self._stop = threading.Event()

    def _write(self) -> None:
        self.timings[self.name] = self.before + time.time() - self.start
        write_json_atomic(self.path, self.timings)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self._write()
            except (UserError, OSError):  # a full or read-only disk: the stage's own writes report it
                return

    def __enter__(self) -> StageClock:
        self.start = time.time()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._write()
        except (UserError, OSError):
            if exc[0] is None:
                raise  # else the stage's own error is the one to report
