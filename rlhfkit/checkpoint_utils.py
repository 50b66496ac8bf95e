"""Checkpoints (spec 7): `log_path/checkpoints/<name>/{state,sampler}` and the `checkpoints.jsonl` index.

A record is appended to checkpoints.jsonl only after the engine has finished writing its directories, so a
run killed mid-save resumes from the previous complete checkpoint. Paths inside the log folder are recorded
relative to it (a copied or moved run folder resumes from its own files) and returned absolute. Before a
checkpoint is used its files are checked against their checksums; a damaged or missing one is skipped with a
warning naming the file, and the previous good checkpoint is used instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Literal

from rlhfkit.compat import warn_ignored
from rlhfkit.errors import CheckpointError, DiskFullError
from rlhfkit.run_files import CHECKPOINTS_DIR, CHECKPOINTS_FILE, SAMPLER_DIR, STATE_DIR
from rlhfkit.utils.atomic import append_jsonl, read_jsonl
from rlhfkit.utils.disk_errors import disk_error
from rlhfkit.utils.faults import fault_point
from rlhfkit.engine.clients import TrainingClient

logger = logging.getLogger(__name__)

CheckpointKind = Literal["state", "sampler", "both"]
_FIELDS = ("name", "epoch", "batch", "final", "state_path", "sampler_path")


@dataclasses.dataclass
class CheckpointRecord:
    """One row of checkpoints.jsonl; keys other than the named fields (e.g. elapsed_tokens) go to `extra`."""

    name: str
    batch: int | None = None
    epoch: int | None = None
    final: bool | None = None
    state_path: str | None = None
    sampler_path: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key) if key in _FIELDS else self.extra.get(key)
        return default if value is None else value

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def to_dict(self) -> dict[str, Any]:
        """name, loop state, extra keys, then the paths; None fields omitted."""
        row: dict[str, Any] = {"name": self.name}
        for key in ("epoch", "batch", "final"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        row.update(self.extra)
        for key in ("state_path", "sampler_path"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        return row

    @staticmethod
    def from_dict(row: dict[str, Any]) -> CheckpointRecord:
        known = {k: row[k] for k in _FIELDS if k in row}
        return CheckpointRecord(**known, extra={k: v for k, v in row.items() if k not in _FIELDS})


def load_checkpoints_file(log_dir: str | os.PathLike) -> list[CheckpointRecord]:
    """All records of `log_dir/checkpoints.jsonl` (none if the file does not exist), with absolute paths.
    Damaged lines are skipped with a warning naming the file and line."""
    log_dir = Path(log_dir).expanduser().resolve()
    records = [CheckpointRecord.from_dict(row) for row in read_jsonl(log_dir / CHECKPOINTS_FILE)]
    for record in records:
        for key in ("state_path", "sampler_path"):
            path = getattr(record, key)
            if path is not None and not Path(path).is_absolute():
                setattr(record, key, str(log_dir / path))
    return records


def checkpoint_problem(record: CheckpointRecord, required_key: str) -> str | None:
    """Why the record's `required_key` directory cannot be loaded (a missing, truncated or changed file), or
    None if its files match their checksums."""
    from rlhfkit.engine.model.lora import META_FILE
    from rlhfkit.engine.model.integrity import verify_checkpoint

    try:
        verify_checkpoint(record.get(required_key), legacy_marker=META_FILE)
    except CheckpointError as e:
        return str(e)
    return None


def get_last_checkpoint(log_dir: str | os.PathLike, required_key: str = "state_path") -> CheckpointRecord | None:
    """The last record that has `required_key` and whose files are intact, or None. A damaged checkpoint is
    skipped with a warning (the one before it is used)."""
    records = [r for r in load_checkpoints_file(log_dir) if r.has(required_key)]
    for record in reversed(records):
        problem = checkpoint_problem(record, required_key)
        if problem is None:
            logger.info("last checkpoint in %s: %s", log_dir, record.to_dict())
            return record
        logger.warning(
            "%s: not using checkpoint %r: %s; falling back to the one before it",
            Path(log_dir) / CHECKPOINTS_FILE,
            record.name,
            problem,
        )
    logger.info("no usable checkpoints with %s in %s", required_key, log_dir)
    return None


def save_checkpoint(
    training_client: TrainingClient,
    name: str,
    log_path: str | os.PathLike,
    loop_state: dict[str, Any],
    kind: CheckpointKind = "both",
    ttl_seconds: int | None = None,
    store: Any = None,
) -> dict[str, str]:
    """Save `training_client` to `log_path/checkpoints/<name>/{state,sampler}` and append the record
    {name, **loop_state, state_path?, sampler_path?}. Returns the paths. (`ttl_seconds` and `store` are
    accepted for API compatibility; local checkpoints never expire.)"""
    warn_ignored("save_checkpoint", ttl_seconds=ttl_seconds, store=store)
    if kind not in ("state", "sampler", "both"):
        raise ValueError(f"kind must be 'state', 'sampler' or 'both', got {kind!r}")
    log_path = Path(log_path).expanduser().resolve()
    directory = log_path / CHECKPOINTS_DIR / name
    paths: dict[str, str] = {}
    try:
        if kind in ("state", "both"):
            paths["state_path"] = training_client.save_state(str(directory / STATE_DIR)).result().path
        if kind in ("sampler", "both"):
            paths["sampler_path"] = training_client.save_weights_for_sampler(str(directory / SAMPLER_DIR)).result().path
    except Exception as e:  # torch.save reports a failed write as a RuntimeError, safetensors as its own error
        problem = disk_error(e, log_path, f"checkpoint {name!r}")
        if isinstance(problem, DiskFullError):
            raise DiskFullError(
                f"no space left on the device of {log_path} while saving checkpoint {name!r}; "
                f"the checkpoints listed in {log_path / CHECKPOINTS_FILE} are intact: free some "
                f"space and run the same command again to resume",
                problem.errno,
            ) from None
        if problem is not None:
            raise problem from None
        raise
    fault_point("checkpoint_record")
    _record(log_path, name, loop_state, paths)
    return paths


def _record(log_path: Path, name: str, loop_state: dict[str, Any], paths: dict[str, str]) -> None:
    for key, path in paths.items():
        if not Path(path).exists():
            raise RuntimeError(f"checkpoint {name!r}: the engine returned {key}={path}, which does not exist")
    stored = {key: _relative_to(Path(path), log_path) for key, path in paths.items()}
    row = CheckpointRecord.from_dict({"name": name, **loop_state, **stored}).to_dict()
    append_jsonl(log_path / CHECKPOINTS_FILE, row)
    logger.info("saved checkpoint %s", row)


def _relative_to(path: Path, folder: Path) -> str:
    """`path` relative to `folder` if it lies inside it, else absolute."""
    path = path.resolve()
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)
