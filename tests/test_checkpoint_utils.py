"""checkpoints.jsonl records, get_last_checkpoint, and save_checkpoint with a real tiny training client."""

import json
from pathlib import Path

import pytest

from rlhfkit.checkpoint_utils import CheckpointRecord, get_last_checkpoint, load_checkpoints_file, save_checkpoint
from rlhfkit.utils.atomic import append_jsonl


def test_record_round_trip_and_accessors():
    row = {
        "name": "000100",
        "epoch": 0,
        "batch": 100,
        "elapsed_tokens": 1234,
        "state_path": "/a/state",
        "sampler_path": "/a/sampler",
    }
    record = CheckpointRecord.from_dict(row)
    assert record.batch == 100 and record.extra == {"elapsed_tokens": 1234}
    assert record.get("elapsed_tokens") == 1234 and record.get("rolling", False) is False
    assert record.has("state_path") and not record.has("final")
    assert record.to_dict() == row and list(record.to_dict()) == list(row)  # same keys, same order


def test_get_last_checkpoint_filters_by_key(tmp_path):
    assert get_last_checkpoint(tmp_path) is None  # no file
    for name in ("s10", "p10", "s20"):  # stand-ins for checkpoint directories (older ones without checksums)
        (tmp_path / name).mkdir()
        (tmp_path / name / "rlhfkit_state.json").write_text("{}")
    append_jsonl(
        tmp_path / "checkpoints.jsonl", {"name": "000010", "batch": 10, "state_path": "s10", "sampler_path": "p10"}
    )
    append_jsonl(tmp_path / "checkpoints.jsonl", {"name": "000020", "batch": 20, "state_path": "s20"})
    with open(tmp_path / "checkpoints.jsonl", "a") as f:
        f.write('{"name": "000030", "batch": 30, "state_pa')  # torn line of a killed writer
    assert [r.name for r in load_checkpoints_file(tmp_path)] == ["000010", "000020"]
    assert get_last_checkpoint(tmp_path).name == "000020"
    assert get_last_checkpoint(tmp_path).state_path == str(tmp_path.resolve() / "s20")  # relative to the folder
    assert get_last_checkpoint(tmp_path, required_key="sampler_path").name == "000010"


def test_save_checkpoint_writes_directories_then_record(tmp_path, tiny_model_dir):
    from rlhfkit.engine import ServiceClient

    client = ServiceClient().create_lora_training_client(tiny_model_dir, rank=2)
    paths = save_checkpoint(client, "000004", tmp_path / "run", {"epoch": 0, "batch": 4, "elapsed_tokens": 99})
    directory = (tmp_path / "run" / "checkpoints" / "000004").resolve()
    assert paths == {"state_path": str(directory / "state"), "sampler_path": str(directory / "sampler")}
    assert all(Path(p).is_dir() and any(Path(p).iterdir()) for p in paths.values())
    rows = [json.loads(line) for line in (tmp_path / "run" / "checkpoints.jsonl").read_text().splitlines()]
    # stored relative to the run folder (a copied folder uses its own files), returned absolute
    assert rows == [
        {
            "name": "000004",
            "epoch": 0,
            "batch": 4,
            "elapsed_tokens": 99,
            "state_path": "checkpoints/000004/state",
            "sampler_path": "checkpoints/000004/sampler",
        }
    ]
    assert get_last_checkpoint(tmp_path / "run").state_path == paths["state_path"]

    sampler_only = save_checkpoint(client, "final", tmp_path / "run", {"batch": 8}, kind="sampler")
    assert list(sampler_only) == ["sampler_path"]
    assert get_last_checkpoint(tmp_path / "run").name == "000004"  # the sampler-only row has no state
    assert get_last_checkpoint(tmp_path / "run", "sampler_path").name == "final"

    # a resumable state: a new client restores it with the optimizer
    restored = ServiceClient().create_training_client_from_state_with_optimizer(paths["state_path"])
    assert restored.spec.rank == 2
    with pytest.raises(ValueError):
        save_checkpoint(client, "x", tmp_path / "run", {}, kind="weights")
