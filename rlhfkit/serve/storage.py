"""The server's storage folder: training runs and their checkpoints, named by `tinker://` paths.

Layout (everything a restarted server needs is here; nothing is kept only in memory but the live clients):

    <storage>/runs/<run_id>/run.json                    the run's record (base model, LoRA config, metadata)
    <storage>/runs/<run_id>/weights/<name>/             save_weights (save_state): adapter + optimizer + RNG
    <storage>/runs/<run_id>/sampler_weights/<name>/     save_weights_for_sampler: adapter only

Every checkpoint folder is the engine's own (a PEFT adapter folder plus rlhfkit_state.json, written atomically),
so `rlhfkit export`, `rlhfkit sample --model` and `create_sampling_client(model_path=...)` in-process read it
as is. A `tinker://<run_id>/<kind>/<name>` path maps to exactly one such folder; ids and names are checked
against a strict pattern first, so no path can leave the storage folder.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.serve.errors import NotFound, UserError
from rlhfkit.utils.atomic import write_json_atomic

# A run id is a model id: "<session id>:train:<n>" (the formula the SDK itself uses for create-via-load).
RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}(:[A-Za-z0-9_-]{1,64}){0,3}$")
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
KINDS = {"weights": "state", "sampler_weights": "sampler"}  # tinker:// kind -> the engine's checkpoint kind
SCHEME = "tinker://"


def check_run_id(run_id: str, field: str = "model_id") -> str:
    if not isinstance(run_id, str) or not RUN_ID.match(run_id):
        raise UserError(f"{field} {run_id!r} is not a valid id (letters, digits, '_', '-', ':')")
    return run_id


def check_name(name: str, field: str = "path") -> str:
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise UserError(
            f"{field} {name!r}: a checkpoint name is 1-128 letters, digits, '_', '-' or '.', not starting with "
            f"'.' and without '..' or '/'"
        )
    return name


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str  # "weights" | "sampler_weights"
    name: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"

    @staticmethod
    def parse(path: str, field: str = "path") -> TinkerPath:
        if not isinstance(path, str) or not path.startswith(SCHEME):
            raise UserError(f"{field} {path!r}: expected tinker://<run id>/weights|sampler_weights/<name>")
        parts = path[len(SCHEME) :].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise UserError(
                f"{field} {path!r}: expected tinker://<run id>/weights/<name> or tinker://<run id>/sampler_weights/<name>"
            )
        return TinkerPath(check_run_id(parts[0], field), parts[1], check_name(parts[2], field))


class Storage:
    """Runs and checkpoints under one folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        (self.root / "runs").mkdir(parents=True, exist_ok=True)

    # Runs
    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / check_run_id(run_id)

    def write_run(self, run_id: str, record: dict[str, Any]) -> None:
        folder = self.run_dir(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "run.json", record)

    def read_run(self, run_id: str) -> dict[str, Any]:
        path = self.run_dir(run_id) / "run.json"
        if not path.is_file():
            raise NotFound(f"training run {run_id!r} not found")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise NotFound(f"training run {run_id!r}: its record {path} cannot be read ({e})") from None

    def list_runs(self) -> list[str]:
        return sorted(p.parent.name for p in (self.root / "runs").glob("*/run.json"))

    def touch_run(self, run_id: str) -> None:
        try:
            record = self.read_run(run_id)
        except NotFound:
            return
        record["last_request_time"] = time.time()
        self.write_run(run_id, record)

    # Checkpoints
    def checkpoint_dir(self, path: TinkerPath) -> Path:
        folder = self.run_dir(path.run_id) / path.kind / path.name
        # the patterns above already rule out escapes; this guards any future change of them
        if self.root not in folder.resolve().parents:
            raise UserError(f"path {path} leaves the storage folder")
        return folder

    def new_checkpoint(self, run_id: str, kind: str, name: str, overwrite: bool = True) -> tuple[TinkerPath, Path]:
        path = TinkerPath(check_run_id(run_id), kind, check_name(name))
        folder = self.checkpoint_dir(path)
        if folder.exists() and not overwrite:
            raise UserError(f"checkpoint {path} exists (overwrite=false)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        return path, folder

    def resolve(self, path: str, field: str = "path", kinds: tuple[str, ...] = tuple(KINDS)) -> tuple[TinkerPath, Path]:
        """The folder of an existing checkpoint named by a tinker:// path."""
        parsed = TinkerPath.parse(path, field)
        if parsed.kind not in kinds:
            raise UserError(f"{field} {path!r}: expected a {' or '.join(kinds)} path")
        folder = self.checkpoint_dir(parsed)
        if not folder.is_dir():
            raise NotFound(f"{field} {path!r}: no such checkpoint on this server")
        return parsed, folder

    def list_checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        run = self.run_dir(run_id)
        out = []
        for kind in KINDS:
            for folder in sorted((run / kind).glob("*")):
                if folder.is_dir() and NAME.match(folder.name):
                    path = TinkerPath(run_id, kind, folder.name)
                    out.append(
                        {
                            "checkpoint_id": path.checkpoint_id,
                            "checkpoint_type": "training" if kind == "weights" else "sampler",
                            "time": _iso(folder.stat().st_mtime),
                            "tinker_path": str(path),
                            "size_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
                            "public": False,
                        }
                    )
        return out

    def delete_checkpoint(self, run_id: str, kind: str, name: str) -> None:
        if kind not in KINDS:
            raise UserError(f"checkpoint kind {kind!r}: expected weights or sampler_weights")
        folder = self.checkpoint_dir(TinkerPath(check_run_id(run_id), kind, check_name(name, "checkpoint")))
        if not folder.is_dir():
            raise NotFound(f"checkpoint tinker://{run_id}/{kind}/{name} not found")
        shutil.rmtree(folder)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
