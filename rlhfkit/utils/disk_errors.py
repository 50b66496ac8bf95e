"""Failed writes as one clear line: which path, what went wrong (no space, a read-only file system, no permission)
and what to free or change.

`disk_error(error, path)` turns such an error into a DiskError (a UserError: the command line prints it as one
line, exit 2), or returns None for any other error. It finds the cause in the error's errno, in its chain of
causes, or in its text: the safetensors writer reports a full disk as `SafetensorError: ... os error 28`, and
torch.save as a RuntimeError naming no errno (then a nearly full disk under `path` is taken as the cause).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from rlhfkit.errors import DiskError, DiskFullError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_TEXT = [
    (re.compile(r"No space left on device|os error 28|StorageFull", re.I), errno.ENOSPC),
    (re.compile(r"Disk quota exceeded|os error 122", re.I), errno.EDQUOT),
    (re.compile(r"Read-only file system|os error 30|ReadOnlyFilesystem", re.I), errno.EROFS),
    (re.compile(r"Permission denied|os error 13|PermissionDenied", re.I), errno.EACCES),
]


def error_number(error: BaseException) -> int | None:
    """The errno of a no-space / read-only / permission error in `error` or its causes, else None."""
    seen = 0
    while error is not None and seen < 8:
        code = getattr(error, "errno", None)
        if code in NO_SPACE + NOT_WRITABLE:
            return code
        for pattern, number in _TEXT:
            if pattern.search(str(error)):
                return number
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def _nearly_full(path: Path) -> bool:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free < 1 << 20
            except OSError:
                return False
    return False


def disk_error(error: BaseException, path: str | os.PathLike, what: str = "") -> DiskError | None:
    """A one-line DiskError for a failed write of `path` (`what`: e.g. "checkpoint '000004'"), or None when
    `error` is not a disk problem (see also `reraise_disk_error`)."""
    if isinstance(error, DiskError):
        return error
    path = Path(path)
    code = error_number(error)
    if code is None and isinstance(error, (OSError, RuntimeError)) and _nearly_full(path):
        code = errno.ENOSPC
    if code is None:
        return None
    filename = getattr(error, "filename", None)
    target = Path(filename) if filename and Path(filename).is_relative_to(path) else path
    subject = f"cannot write {target}" + (f" ({what})" if what else "")
    if code in NO_SPACE:
        reason = "no space left on its device" if code == errno.ENOSPC else "disk quota exceeded"
        return DiskFullError(
            f"{subject}: {reason}; free some space there (or write elsewhere: another log_root / --out, "
            f"RLHFKIT_CACHE_DIR for the model cache) and run the same command again; what was saved before is intact",
            code,
        )
    reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}.get(
        code, "operation not permitted"
    )
    return DiskError(
        f"{subject}: {reason}; choose a writable folder (log_root=..., --out ..., RLHFKIT_CACHE_DIR for the model "
        f"cache) or make this one writable",
        code,
    )


def reraise_disk_error(error: BaseException, path: str | os.PathLike, what: str = "") -> None:
    """Raise the one-line DiskError for `error` if it is a disk problem (the traceback's cause chain dropped)."""
    problem = disk_error(error, path, what)
    if problem is not None and problem is not error:
        raise problem from None
