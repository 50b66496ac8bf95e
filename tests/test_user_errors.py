"""Bad data files, model paths and checkpoints: one line naming the file/row/field, exit 2, no traceback
(`--debug` shows it). Run in-process through the CLI entry point with the tiny model."""

import gzip
import json
import re
from pathlib import Path

import pytest

from rlhfkit.cli import main


def hh_row(i: int) -> str:
    return (
        json.dumps(
            {"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: Yes {i}.", "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: No."}
        )
        + "\n"
    )


def write_gz(path: Path, text: str, truncate: bool = False) -> Path:
    data = gzip.compress(text.encode())
    path.write_bytes(data[: len(data) // 2] if truncate else data)
    return path


def cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra pipeline arguments, a regex the one-line message must match)."""
    (tmp / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    (tmp / "no_chosen.jsonl").write_text(json.dumps({"rejected": "x"}) + "\n")
    (tmp / "empty_dir").mkdir()
    (tmp / "notes.txt").write_text("hello")
    return {
        "base_model folder missing": (["base_model=/nonexistent"], r"base_model='/nonexistent': no such model folder"),
        "base_model folder without config.json": ([f"base_model={tmp / 'empty_dir'}"], r"has no config\.json"),
        "base_model unknown Hub id (offline)": (["base_model=nosuchorg/nosuchmodel"], r"nosuchorg/nosuchmodel"),
        "sft_data missing": ([f"sft_data={tmp / 'missing.jsonl'}"], r"sft_data=.*missing\.jsonl.*not found"),
        "sft_data bad line": ([f"sft_data={tmp / 'bad.jsonl'}"], r"bad\.jsonl, line 2: not valid JSON"),
        "sft_data truncated gzip": (
            [f"sft_data={write_gz(tmp / 'sft.jsonl.gz', hh_row(0) * 50, True)}"],
            r"sft\.jsonl\.gz, line 1: cannot be read",
        ),
        "hh_data missing": (["run_sft=false", f"hh_data={tmp / 'missing.jsonl.gz'}"], r"hh_data=.*not found"),
        "hh_data not a data file": (
            ["run_sft=false", f"hh_data={tmp / 'notes.txt'}"],
            r"hh_data=.*notes\.txt.*unsupported file type",
        ),
        "hh_data truncated gzip": (
            ["run_sft=false", f"hh_data={write_gz(tmp / 'hh.jsonl.gz', hh_row(0) * 2000, True)}"],
            r"hh\.jsonl\.gz, line \d+: cannot be read",
        ),
        # a bad row is counted and skipped (tests/test_data_sources.py); a file with no usable row stops the run
        "hh_data without a usable row": (
            ["run_sft=false", f"hh_data={tmp / 'no_chosen.jsonl'}"],
            r"no usable comparisons",
        ),
    }


def test_every_bad_input_is_one_clear_line(tmp_path, tiny_model_dir, capsys):
    failures = []
    for name, (args, pattern) in cases(tmp_path).items():
        argv = [
            "pipeline",
            "preset=smoke",
            f"base_model={tiny_model_dir}",
            f"log_root={tmp_path / 'runs' / name}",
            "report=false",
            *args,
        ]
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1] if err.strip() else ""
        if code != 2 or "Traceback" in err or not last.startswith("rlhfkit: error:") or not re.search(pattern, last):
            failures.append(f"{name}: exit {code}, last stderr line {last!r}")
        assert not list((tmp_path / "runs" / name).rglob("metrics.jsonl")), f"{name}: training started"
    assert not failures, "\n".join(failures)


def test_debug_shows_the_traceback(tmp_path):
    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match="no such model folder"):
        main(["pipeline", "preset=smoke", "base_model=/nonexistent", f"log_root={tmp_path}", "--debug"])


def test_sample_from_a_folder_without_intact_checkpoints_is_one_line(tmp_path, capsys):
    (tmp_path / "checkpoints.jsonl").write_text(json.dumps({"name": "final", "sampler_path": "gone"}) + "\n")
    assert main(["sample", "--model", str(tmp_path), "hi"]) == 2
    assert "lists no intact sampler checkpoint" in capsys.readouterr().err
