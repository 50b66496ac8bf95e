"""Atomic writes: nothing already on disk is lost or half-written if the process is killed. A write that fails for
lack of space, a read-only file system or a missing permission raises a one-line DiskError naming the path
(utils/disk_errors.py), after removing its temporary file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rlhfkit.utils.disk_errors import disk_error, reraise_disk_error
from rlhfkit.utils.faults import fault_point

logger = logging.getLogger(__name__)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary sibling and an atomic rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        reraise_disk_error(e, path)
        raise
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fault_point("write_file")
        os.replace(tmp, path)
    except BaseException as e:
        problem = disk_error(e, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if problem is not None and problem is not e:
            raise problem from None
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync it. A kill can at worst leave a torn last line: the next append cuts
    it off first, and `read_jsonl` skips it, so every earlier record survives."""
    path = Path(path)
    line = json.dumps(record, default=str) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            _cut_torn_last_line(f, path)
            half = len(line) // 2
            f.write(line[:half].encode("utf-8"))
            f.flush()
            fault_point("append_jsonl")  # a kill here leaves a torn line
            f.write(line[half:].encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a torn last line left by a failed write is cut off by the next append
        reraise_disk_error(e, path)
        raise


def _cut_torn_last_line(f: Any, path: Path) -> None:
    """Truncate an unterminated last line (left by a killed writer) of a file opened in "a+b" mode."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    block = 1 << 16
    end = size
    while end > 0:  # find the last newline
        start = max(0, end - block)
        f.seek(start)
        chunk = f.read(end - start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            break
        end = start
    else:
        keep = 0
    logger.warning("%s: cutting off its unfinished last line (%d bytes, left by a killed writer)", path, size - keep)
    f.truncate(keep)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL log. A damaged line (not a JSON object, or a torn last line left by a killed
    writer) is skipped with a warning naming the file and line; the rest are kept."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not line.endswith("\n"):
                logger.warning("%s, line %d: skipping an unfinished last line (left by a killed writer)", path, line_no)
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                logger.warning(
                    "%s, line %d: skipping a damaged line (not valid JSON: %s): %.80s",
                    path,
                    line_no,
                    e.msg,
                    line.strip(),
                )
                continue
            if not isinstance(record, dict):
                logger.warning(
                    "%s, line %d: skipping a damaged line (a JSON %s, not an object)",
                    path,
                    line_no,
                    type(record).__name__,
                )
                continue
            records.append(record)
    return records


def rewrite_jsonl_atomic(path: str | os.PathLike, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in records))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        reraise_disk_error(e, path)
        raise
    try:
        yield tmp
        fault_point("directory_written")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            fault_point("directory_swap")  # a kill here leaves only .<name>.old: clean_partial_writes restores it
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        problem = disk_error(e, path)  # before the cleanup frees the space a nearly full disk shows
        shutil.rmtree(tmp, ignore_errors=True)
        if problem is not None and problem is not e:
            raise problem from None  # no space, read-only, no permission: one line naming `path`
        raise


def clean_partial_writes(folder: str | os.PathLike, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Remove what killed writers left under `folder` (temporary `.<name>.*.tmp` files and directories), and
    put back a directory whose replacement was interrupted (`.<name>.old` without `<name>`), except under the
    folders in `skip`. Call it only while holding the folder's run lock. Returns the paths removed or restored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []

    def skipped(p: Path) -> bool:
        return any(p.is_relative_to(s) for s in skip)

    touched = []
    for tmp in sorted(p for p in folder.rglob(".*.tmp") if not skipped(p)):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        touched.append(tmp)
    for old in sorted(p for p in folder.rglob(".*.old") if not skipped(p)):
        target = old.with_name(old.name[1 : -len(".old")])
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
        touched.append(old)
    if touched:
        logger.warning(
            "%s: removed or restored %d files left by a killed run: %s",
            folder,
            len(touched),
            ", ".join(str(p.relative_to(folder)) for p in touched[:5]),
        )
    return touched
