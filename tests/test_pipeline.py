"""The whole pipeline end to end (smoke preset: a tiny random model), its resume, and the tutorial's code."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfkit.utils.atomic import read_jsonl

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RLHFKIT_DTYPE": "float32", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def run_pipeline(log_root: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "rlhfkit.recipes.preference.rlhf.rlhf_pipeline", "preset=smoke",
           f"log_root={log_root}", *extra]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def final_metrics(log_root: Path) -> dict:
    return {stage: read_jsonl(log_root / stage / "metrics.jsonl") for stage in ("sft", "rm", "rl")}


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    result = run_pipeline(root)
    return root, result


def test_smoke_preset_runs_all_stages_and_writes_the_report(smoke_run):
    root, _result = smoke_run
    for stage in ("sft", "rm", "rl"):
        records = read_jsonl(root / stage / "metrics.jsonl")
        assert [r["step"] for r in records] == list(range(len(records))) and records
        assert any(r.get("name") == "final" for r in read_jsonl(root / stage / "checkpoints.jsonl"))
    assert "test/nll" in read_jsonl(root / "sft" / "metrics.jsonl")[0]
    assert any("test/win_rate" in r for r in read_jsonl(root / "rl" / "metrics.jsonl"))
    pm_eval = json.loads((root / "rm" / "pm_eval.json").read_text())
    assert 0.0 <= pm_eval["pm/accuracy"] <= 1.0 and pm_eval["pm/n"] > 0
    report = (root / "report.html").read_text()
    assert "SFT" in report and "win_rate" in report and "Base model vs RLHF model" in report
    assert (root / "report.md").exists() and (root / "report" / "rl.png").exists()
    replies = json.loads((root / "report_replies.json").read_text())["replies"]
    assert len(replies) == 2 and all(item["base"] and item["rlhf"] for item in replies)  # tutorial + 1 prompt
    settings = json.loads((root / "pipeline_config.json").read_text())
    from rlhfkit.recipes.preference.rlhf.pipeline_config import parse_args

    assert parse_args([f"config={root / 'pipeline_config.json'}"]) == parse_args(["preset=smoke",
                                                                                 f"log_root={root}"])
    assert settings["log_root"] == str(root)
    rl_config = json.loads((root / "rl" / "config.json").read_text())
    assert rl_config["dataset_builder"]["comparison_builder"]["max_chars"] == 300
    assert rl_config["evaluator_builders"][0]["comparison_builder"]["test_size"] == 4
    assert list((root / "rl").glob("iteration_*/train.html"))


def test_a_finished_pipeline_started_again_skips_every_stage(smoke_run):
    root, _ = smoke_run
    before = final_metrics(root)
    result = run_pipeline(root, "report=false")
    assert result.stdout.count("already finished") == 3
    assert final_metrics(root) == before


def test_killed_during_stage_2_resumes_with_the_same_results(smoke_run, tmp_path):
    reference, _ = smoke_run
    root = tmp_path / "killed"
    proc = run_pipeline(root, "report=false", wait=False)
    checkpoints = root / "rm" / "checkpoints.jsonl"
    deadline = time.time() + 600
    while not read_jsonl(checkpoints) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)  # stage 2 has 12 steps: after its first checkpoint (step 2) about 2 s remain
    assert proc.poll() is None, "the pipeline ended before stage 2 saved a checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sft_before = (root / "sft" / "metrics.jsonl").read_bytes()
    assert not any(r.get("name") == "final" for r in read_jsonl(checkpoints))

    run_pipeline(root, "report=false")
    assert (root / "sft" / "metrics.jsonl").read_bytes() == sft_before  # stage 1 untouched
    got, expected = final_metrics(root), final_metrics(reference)
    for stage in ("rm", "rl"):
        assert without_timing(got[stage]) == without_timing(expected[stage]), stage


def test_tutorial_transcription_runs(tiny_model_dir, tmp_path):
    script = REPO / "examples" / "tutorial_407_rlhf_pipeline.py"
    result = subprocess.run([sys.executable, str(script), tiny_model_dir, str(tmp_path), "2"], env=ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Stage 3 (RL) complete." in result.stdout
    assert "=== Base Model ===" in result.stdout and "=== RLHF Model ===" in result.stdout


def test_stage_clock_counts_time_while_the_stage_runs(tmp_path):
    from rlhfkit.utils.timing import StageClock

    path = tmp_path / "stage_times.json"
    timings = {"sft": 5.0, "rm": 2.0}
    with StageClock(path, timings, "rm", every=0.05):
        time.sleep(0.3)
        running = json.loads(path.read_text())  # what a killed run would leave behind
        assert running["sft"] == 5.0 and running["rm"] > 2.0  # the ticks counted time already
    assert json.loads(path.read_text())["rm"] >= 2.3


def test_report_prompts_come_from_the_runs_hh_data():
    from rlhfkit.recipes.preference.datasets import hh_data_files, load_hh_rlhf_rows
    from rlhfkit.recipes.preference.rlhf.pipeline_data import held_out_comparisons
    from rlhfkit.recipes.preference.rlhf.rlhf_pipeline import parse_args
    from rlhfkit.recipes.preference.rlhf.report_replies import TUTORIAL_PROMPT, report_prompts

    cfg = parse_args(["preset=demo", "report_prompts=3"])
    assert cfg.hh_data == "harmless-base"
    prompts = report_prompts(cfg)
    assert prompts[0] == [{"role": "user", "content": TUTORIAL_PROMPT}] and len(prompts) == 4
    harmless_text = "".join(row["chosen"] for row in load_hh_rlhf_rows(hh_data_files("harmless-base")))
    for conversation in prompts[1:]:
        assert all(message["content"] in harmless_text for message in conversation)
    win_rate_prompts = [c.comparison.prompt_conversation for c in held_out_comparisons(cfg, "rl", 32)]
    assert prompts[1:] == win_rate_prompts[:3]  # the report shows the first of the win-rate prompts


def test_rl_stage_alone_with_a_kl_penalty_to_the_sft_policy(smoke_run, tmp_path):
    import shutil

    reference, _ = smoke_run
    root = tmp_path / "kl"
    for stage in ("sft", "rm"):
        shutil.copytree(reference / stage, root / stage)
    shutil.copytree(reference / "tiny_model", root / "tiny_model")
    run_pipeline(root, "run_sft=false", "run_rm=false", "report=false", "rl_kl_penalty_coef=0.5")
    records = read_jsonl(root / "rl" / "metrics.jsonl")
    assert len(records) == len(read_jsonl(reference / "rl" / "metrics.jsonl"))
    # kl_policy_base: mean log-ratio of the sampled reply tokens, sampler vs SFT policy. The first batch is
    # sampled from the SFT weights themselves, so it is ~0; later batches differ from it.
    kl = [r["kl_policy_base"] for r in records]
    assert abs(kl[0]) < 1e-3 and any(abs(k) > 1e-3 for k in kl[1:])


def test_reply_check_example_counts_the_runs_replies(smoke_run):
    root, _ = smoke_run
    script = REPO / "examples" / "reply_check.py"
    result = subprocess.run([sys.executable, str(script), str(root), "--samples", "2", "--show", "1"], env=ENV,
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    prompts = json.loads((root / "pipeline_config.json").read_text())["win_rate_prompts"]
    summary = result.stdout.splitlines()[0]
    assert summary.startswith(f"{root / 'rl'}: ") and " x 2) at temperature 1.0: " in summary, summary
    replies = int(summary.split(": ")[1].split(" replies")[0])
    assert 0 < replies <= 2 * prompts and replies % 2 == 0
