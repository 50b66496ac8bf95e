"""Checkpoints (spec 7): `log_path/checkpoints/<name>/{state,sampler}` and the `checkpoints.jsonl` index.

A record is appended to checkpoints.jsonl only after the engine has finished writing its directories, so a
run killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Literal

from rlhfkit.compat import warn_ignored
from rlhfkit.utils.atomic import append_jsonl, read_jsonl

logger = logging.getLogger(__name__)

CHECKPOINTS_FILE = "checkpoints.jsonl"
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
    """All records of `log_dir/checkpoints.jsonl` (none if the file does not exist)."""
    return [CheckpointRecord.from_dict(row) for row in read_jsonl(Path(log_dir) / CHECKPOINTS_FILE)]


def get_last_checkpoint(log_dir: str | os.PathLike, required_key: str = "state_path") -> CheckpointRecord | None:
    """The last record that has `required_key`, or None."""
    records = [r for r in load_checkpoints_file(log_dir) if r.has(required_key)]
    if not records:
        logger.info("no checkpoints with %s in %s", required_key, log_dir)
        return None
    logger.info("last checkpoint in %s: %s", log_dir, records[-1].to_dict())
    return records[-1]


def save_checkpoint(training_client: Any, name: str, log_path: str | os.PathLike, loop_state: dict[str, Any],
                    kind: CheckpointKind = "both", ttl_seconds: int | None = None, store: Any = None) -> dict[str, str]:
    """Save `training_client` to `log_path/checkpoints/<name>/{state,sampler}` and append the record
    {name, **loop_state, state_path?, sampler_path?}. Returns the paths. (`ttl_seconds` and `store` are
    accepted for API compatibility; local checkpoints never expire.)"""
    warn_ignored("save_checkpoint", ttl_seconds=ttl_seconds, store=store)
    if kind not in ("state", "sampler", "both"):
        raise ValueError(f"kind must be 'state', 'sampler' or 'both', got {kind!r}")
    log_path = Path(log_path).expanduser().resolve()
    directory = log_path / "checkpoints" / name
    paths: dict[str, str] = {}
    if kind in ("state", "both"):
        paths["state_path"] = training_client.save_state(str(directory / "state")).result().path
    if kind in ("sampler", "both"):
        paths["sampler_path"] = training_client.save_weights_for_sampler(str(directory / "sampler")).result().path
    _record(log_path, name, loop_state, paths)
    return paths


def _record(log_path: Path, name: str, loop_state: dict[str, Any], paths: dict[str, str]) -> None:
    for key, path in paths.items():
        if not Path(path).exists():
            raise RuntimeError(f"checkpoint {name!r}: the engine returned {key}={path}, which does not exist")
    row = CheckpointRecord.from_dict({"name": name, **loop_state, **paths}).to_dict()
    append_jsonl(log_path / CHECKPOINTS_FILE, row)
    logger.info("saved checkpoint %s", row)
