"""One run per log folder: `with RunLock(folder):` holds `folder/.rlhfkit.lock` while a run writes there.

The lock is an exclusive `flock` on the file, which the kernel releases when the process ends however it ends,
so the lock of a killed run is taken over without any stale-lock guessing. The file names the holder (pid,
host, command) for the error a second run gets. On entry, what a killed run left half-written is cleaned up
(`atomic.clean_partial_writes`): only the lock holder may do that.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from rlhfkit.errors import RunLockedError
from rlhfkit.run_files import LOCK_FILE
from rlhfkit.utils.atomic import clean_partial_writes
from rlhfkit.utils.disk_errors import reraise_disk_error


class RunLock:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser().resolve()
        self.path = self.folder / LOCK_FILE
        self._file: Any = None

    def __enter__(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as e:  # a read-only or full disk, no permission: one line naming the folder
            reraise_disk_error(e, self.path, "the run's lock file")
            raise
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise RunLockedError(
                f"{self.folder} is in use by another run ({_describe(holder)}); wait for it to "
                f"end or stop it, or choose another log folder"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}))
            handle.flush()
        except OSError as e:
            handle.close()
            reraise_disk_error(e, self.path, "the run's lock file")
            raise
        self._file = handle
        clean_partial_writes(self.folder, skip=tuple(_folders_in_use(self.folder)))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.close()  # releases the flock; the file stays (removing it would race with a new holder)
            self._file = None


def _folders_in_use(folder: Path) -> list[Path]:
    """Sub-folders of `folder` locked by a running process (e.g. a stage run on its own inside a pipeline's
    folder): their partial files belong to that process."""
    busy = []
    for lock in folder.rglob(LOCK_FILE):
        if lock.parent == folder:
            continue
        with open(lock, "a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy.append(lock.parent)
    return busy


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"process {info['pid']} on {info['host']}: {info['command']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "a process that has not written its name yet"
