"""A run folder's record of its settings: log_root/pipeline_config.json describes the run that wrote the folder.

Starting again on a folder compares the new settings with the recorded ones. A difference that could change
what a finished or started stage computed is refused (`SettingsChangedError`, listing `key: recorded → new`)
before anything is written or loaded, unless `allow_changed_settings=true`. What may differ is decided in
pipeline_config.py (FREE_TO_CHANGE, GROUP_STAGES). Whenever the record changes, the earlier one is kept as
pipeline_config.N.json (N = 1, 2, ...), so the folder holds every set of settings it was run with.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError
from rlhfkit.recipes.preference.rlhf.pipeline_config import FREE_TO_CHANGE, GROUP_STAGES, PipelineConfig
from rlhfkit.run_files import PIPELINE_CONFIG_FILE, kept_pipeline_config_file
from rlhfkit.utils.atomic import write_json_atomic

CONFIG_FILE = PIPELINE_CONFIG_FILE  # the run's settings: `config=log_root/pipeline_config.json` re-creates them
NOT_RECORDED = ("allow_changed_settings",)  # a choice of one start, not a property of the run


class SettingsChangedError(UserError):
    """Settings that differ from the ones recorded in the run folder."""


def record_of(cfg: PipelineConfig) -> dict[str, Any]:
    """The settings as pipeline_config.json holds them (JSON values)."""
    values = dataclasses.asdict(cfg)
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in NOT_RECORDED}))


def read_record(log_root: str | Path) -> dict[str, Any] | None:
    path = Path(log_root) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(
            f"{path}: the run's recorded settings cannot be read ({e}); repair or remove the file"
        ) from None
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: the run's recorded settings are not a JSON object; repair or remove the file")
    return recorded


def differences(recorded: dict[str, Any], cfg: PipelineConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, new)} for every setting that differs (a setting the record lacks, e.g. one added since the
    run started, counts as its default)."""
    new = record_of(cfg)
    out = {}
    for f in dataclasses.fields(PipelineConfig):
        if f.name in NOT_RECORDED:
            continue
        old = recorded[f.name] if f.name in recorded else json.loads(json.dumps(f.default))
        if old != new[f.name]:
            out[f.name] = (old, new[f.name])
    return out


def refused_differences(recorded: dict[str, Any], cfg: PipelineConfig) -> dict[str, tuple[Any, Any]]:
    """The differences that could change what the run's started stages computed (the rule of pipeline_config.py)."""
    groups = {f.name: f.metadata.get("group", "shared") for f in dataclasses.fields(PipelineConfig)}
    started = {stage for stage in ("sft", "rm", "rl", "dpo") if (Path(cfg.log_root) / stage).exists()}

    def may_change(key: str) -> bool:
        stages = GROUP_STAGES.get(groups[key])
        return key in FREE_TO_CHANGE or (stages is not None and not started & set(stages))

    return {k: v for k, v in differences(recorded, cfg).items() if not may_change(k)}


def check_recorded_settings(cfg: PipelineConfig) -> None:
    """Raise SettingsChangedError (one line) if cfg differs from the folder's record in a way that is refused and
    allow_changed_settings is off. Reads only."""
    recorded = read_record(cfg.log_root)
    if recorded is None or cfg.allow_changed_settings:
        return
    refused = refused_differences(recorded, cfg)
    if refused:
        listed = "; ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in refused.items())
        raise SettingsChangedError(
            f"{Path(cfg.log_root) / CONFIG_FILE}: these settings differ from the ones the run was started with: "
            f"{listed}. Use another log_root, or allow_changed_settings=true to continue with the new settings "
            f"(the earlier record is kept)"
        )


def write_record(cfg: PipelineConfig) -> Path | None:
    """Write pipeline_config.json; if it held other settings, keep them as pipeline_config.N.json first (returned)."""
    root = Path(cfg.log_root)
    root.mkdir(parents=True, exist_ok=True)
    recorded = read_record(root)
    new = record_of(cfg)
    kept = None
    if recorded is not None and recorded != new:
        n = 1
        while (root / kept_pipeline_config_file(n)).exists():
            n += 1
        kept = root / kept_pipeline_config_file(n)
        write_json_atomic(kept, recorded)
    write_json_atomic(root / CONFIG_FILE, new)
    return kept
