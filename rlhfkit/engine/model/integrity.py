"""Checksums of a checkpoint directory's files, written last and verified before anything is loaded.

`checksums.json` maps every file of the directory to its size and SHA-256. It is written after all other files,
inside the atomic directory, so a directory that has it was complete when it was written; a file truncated,
changed or removed since is found by `verify_checkpoint`, which names it. Directories written before checksums
existed (no checksums.json, but rlhfkit_state.json) are loaded with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from rlhfkit.errors import CheckpointError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "checksums.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file in `folder` (call it after the last file is written)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": manifest}, indent=2))


def verify_checkpoint(folder: str | Path, legacy_marker: str | tuple[str, ...]) -> None:
    """Raise CheckpointError naming the first missing, truncated or changed file of the checkpoint `folder`.
    A folder without checksums.json but with a `legacy_marker` file (an older rlhfkit checkpoint, or a PEFT
    adapter folder made elsewhere) passes with a warning."""
    markers = (legacy_marker,) if isinstance(legacy_marker, str) else legacy_marker
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist (deleted or moved?)")
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.exists():
        if any((folder / marker).exists() for marker in markers):
            logger.warning(
                "checkpoint %s has no %s (an older rlhfkit checkpoint or an adapter made elsewhere): "
                "its files are not verified",
                folder,
                MANIFEST_FILE,
            )
            return
        raise CheckpointError(
            f"{folder} is not a complete rlhfkit checkpoint (no {MANIFEST_FILE} or "
            f"{' or '.join(markers)}); expected a directory written by save_state or "
            f"save_weights_for_sampler"
        )
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: damaged ({e})") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} is damaged: {size} bytes, {expected['bytes']} written (truncated?)"
            )
        if file_sha256(path) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint file {path} is damaged: its SHA-256 differs from the one recorded when it was written"
            )
