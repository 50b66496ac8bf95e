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
    cmd = [
        sys.executable,
        "-m",
        "rlhfkit",
        "pipeline",
        "preset=smoke",
        f"log_root={log_root}",
        *extra,
    ]
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
    # one engine value for the run, recorded, and the one every stage (and the RL judge) was given
    engine = json.loads((root / "environment.json").read_text())["engine"]
    assert engine["inference_engine"] == "torch"  # the smoke preset's
    for stage in ("sft", "rm", "rl"):
        assert json.loads((root / stage / "config.json").read_text())["engine"]["inference_engine"] == "torch"
    rl_config = json.loads((root / "rl" / "config.json").read_text())
    assert rl_config["dataset_builder"]["preference_model_builder"]["engine"]["inference_engine"] == "torch"
    with open(root / "report.html", newline="") as f:
        report = f.read()
    assert "SFT" in report and "win_rate" in report and "Base model vs SFT vs RLHF model" in report
    assert (root / "report.md").exists() and (root / "report" / "rl.png").exists()
    replies_file = json.loads((root / "report_replies.json").read_text())
    replies = replies_file["replies"]
    assert len(replies) == 2 and all(item["base"] and item["sft"] and item["rlhf"] for item in replies)  # tutorial + 1
    assert replies_file["sampling"] == {"temperature": 0.7, "max_tokens": 200, "seed": 0}
    assert replies_file["policies"] == {
        "base": None,
        "sft": "sft/checkpoints/final/sampler",
        "rlhf": "rl/checkpoints/final/sampler",
    }
    with open(root / "report.md", newline="") as f:  # the random replies hold "\r"
        markdown = f.read()
    assert "temperature 0.7, at most 200 tokens, seed 0" in markdown and "temperature 0.7" in report
    from html import escape

    for item in replies:  # the three replies side by side
        assert all(
            f"- **{label}:** {item[key]}" in markdown
            for key, label in (("base", "base"), ("sft", "SFT"), ("rlhf", "RLHF"))
        )
        assert f"<h4>SFT</h4><pre>{escape(item['sft'])}</pre>" in report
    pages = sorted(p.relative_to(root).as_posix() for p in (root / "rl").glob("iteration_*/train.html"))
    assert pages and all(f"<a href='{page}'>" in report and f"({page})" in markdown for page in pages)
    win_rates = [r for r in read_jsonl(root / "rl" / "metrics.jsonl") if "test/win_rate" in r]
    final_line = [line for line in _result.stdout.splitlines() if "final win rate" in line]
    assert final_line == [
        f"[rlhfkit] final win rate vs the human-chosen replies: "
        f"{100 * win_rates[-1]['test/win_rate']:.1f}% ± {100 * win_rates[-1]['test/stderr']:.1f}% "
        f"at RL step {win_rates[-1]['step']} (step 0: {100 * win_rates[0]['test/win_rate']:.1f}%)"
    ]
    assert final_line[0].removeprefix("[rlhfkit] ") in markdown
    settings = json.loads((root / "pipeline_config.json").read_text())
    from rlhfkit.recipes.preference.rlhf.pipeline_config import parse_args

    assert parse_args([f"config={root / 'pipeline_config.json'}"]) == parse_args(["preset=smoke", f"log_root={root}"])
    assert settings["log_root"] == str(root)
    rl_config = json.loads((root / "rl" / "config.json").read_text())
    assert rl_config["dataset_builder"]["comparison_builder"]["max_chars"] == 300
    assert rl_config["evaluator_builders"][0]["comparison_builder"]["test_size"] == 4
    assert list((root / "rl").glob("iteration_*/train.html"))


def files_of(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_a_finished_pipeline_started_again_skips_every_stage(smoke_run):
    root, _ = smoke_run
    before = final_metrics(root)
    recorded = json.loads((root / "pipeline_config.json").read_text())
    # settings that never change what a stage computed may differ; the earlier record is kept
    result = run_pipeline(root, "report=false", "wandb_name=again", "run_dpo=false", "num_groups_to_log=1")
    assert result.stdout.count("already finished") == 3
    assert final_metrics(root) == before
    assert json.loads((root / "pipeline_config.1.json").read_text()) == recorded
    assert "kept in" in result.stdout and json.loads((root / "pipeline_config.json").read_text()) == {
        **recorded,
        "report": False,
        "wandb_name": "again",
        "run_dpo": False,
        "num_groups_to_log": 1,
    }


def test_changed_settings_on_a_run_folder_are_refused_or_continued_with_the_history_kept(smoke_run, tmp_path):
    import shutil

    reference, _ = smoke_run
    root = tmp_path / "changed"
    for name in ("sft", "rm", "rl", "tiny_model"):
        shutil.copytree(reference / name, root / name)
    shutil.copy(reference / "pipeline_config.json", root)
    before = files_of(root)
    recorded = json.loads((root / "pipeline_config.json").read_text())
    cmd = [
        sys.executable,
        "-m",
        "rlhfkit",
        "pipeline",
        "preset=smoke",
        f"log_root={root}",
        "lora_rank=32",
        "sft_learning_rate=1",
        "report=false",
    ]
    refused = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    line = refused.stderr.strip()
    assert "\n" not in line and line.startswith("rlhfkit: error:")
    assert "lora_rank: 4 → 32; sft_learning_rate: 0.0002 → 1.0. " in line and "allow_changed_settings" in line
    assert "report:" not in line and "log_root:" not in line  # free settings are not listed
    assert files_of(root) == before  # nothing written (no lock file, no record, no model loaded)

    result = run_pipeline(root, "lora_rank=32", "sft_learning_rate=1", "report=false", "allow_changed_settings=true")
    assert result.stdout.count("already finished") == 3
    now = json.loads((root / "pipeline_config.json").read_text())
    assert (now["lora_rank"], now["sft_learning_rate"], recorded["lora_rank"]) == (32, 1.0, 4)
    assert json.loads((root / "pipeline_config.1.json").read_text()) == recorded
    again = run_pipeline(root, "lora_rank=32", "sft_learning_rate=1", "report=false")  # the new record holds
    assert again.stdout.count("already finished") == 3 and not (root / "pipeline_config.2.json").exists()


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
    result = subprocess.run(
        [sys.executable, str(script), tiny_model_dir, str(tmp_path), "2"],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
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
    result = subprocess.run(
        [sys.executable, str(script), str(root), "--samples", "2", "--show", "1"],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    prompts = json.loads((root / "pipeline_config.json").read_text())["win_rate_prompts"]
    summary = result.stdout.splitlines()[0]
    assert summary.startswith(f"{root / 'rl'}: ") and " x 2) at temperature 1.0: " in summary, summary
    replies = int(summary.split(": ")[1].split(" replies")[0])
    assert 0 < replies <= 2 * prompts and replies % 2 == 0


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium_with_its_plots(smoke_run, tmp_path):
    """A screenshot of report.html shows the curves: the plots' line colours (matplotlib's first two, blue
    #1f77b4 and orange #ff7f0e) cover many pixels of the rendered page, which text and tables never use."""
    import numpy as np
    from PIL import Image

    root, _ = smoke_run
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            _chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,3000",
            f"--screenshot={shot}",
            (root / "report.html").resolve().as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (3000, 1200)

    def count(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) < 40).sum())

    blue, orange = count((31, 119, 180)), count((255, 127, 14))
    assert blue > 800 and orange > 300, (blue, orange)  # 1896 and 797 on the smoke run; a page without its plots: 0
    rows_with_blue = np.flatnonzero((np.abs(pixels - np.array((31, 119, 180))).sum(axis=-1) < 40).any(axis=1))
    assert rows_with_blue.max() - rows_with_blue.min() > 800  # the SFT, preference-model and RL plots, stacked


def test_eval_command_reproduces_the_runs_accuracy_and_win_rate(smoke_run, tmp_path):
    from rlhfkit.cli import main

    root, _ = smoke_run
    cfg = json.loads((root / "pipeline_config.json").read_text())
    assert cfg["hh_data"] is None and cfg["hh_max_chars"] == 300  # the smoke preset's data: all offline splits
    assert (
        main(
            [
                "eval",
                "pm",
                "--model",
                str(root / "rm"),
                "--n",
                str(cfg["pm_eval_size"]),
                "--max-chars",
                "300",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    got = json.loads((tmp_path / "pm_eval.json").read_text())["metrics"]
    assert got == json.loads((root / "rm" / "pm_eval.json").read_text())
    assert "Comparison 0" in (tmp_path / "pm_eval.html").read_text()

    # the last win rate the run measured: on the weights saved in the checkpoint of that step
    step, win_rate = [
        (r["step"], r["test/win_rate"]) for r in read_jsonl(root / "rl" / "metrics.jsonl") if "test/win_rate" in r
    ][-1]
    assert step > 0
    assert (
        main(
            [
                "eval",
                "winrate",
                "--judge",
                str(root / "rm"),
                "--policy",
                str(root / "rl" / "checkpoints" / f"{step:06d}" / "sampler"),
                "--n",
                str(cfg["win_rate_prompts"]),
                "--max-chars",
                "300",
                "--max-tokens",
                str(cfg["rl_max_tokens"]),
                "--seed",
                str(cfg["seed"]),
                "--reward-mode",
                cfg["reward_mode"],
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "winrate.json").read_text())
    assert result["metrics"]["win_rate"] == pytest.approx(win_rate, abs=1e-9)
    assert len(result["matchups"]) == cfg["win_rate_prompts"]
    assert "Policy" in (tmp_path / "winrate.html").read_text()


def test_rl_starts_from_named_sft_and_rm_checkpoints(smoke_run, tmp_path):
    reference, _ = smoke_run
    peft_rm = tmp_path / "peft_rm"  # the preference model as a plain PEFT adapter folder (no rlhfkit_state.json)
    peft_rm.mkdir()
    final_rm = reference / "rm" / "checkpoints" / "final" / "sampler"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (peft_rm / name).write_bytes((final_rm / name).read_bytes())
    root = tmp_path / "named"
    run_pipeline(
        root,
        "run_sft=false",
        "run_rm=false",
        "report=false",
        "rl_max_steps=1",
        "rl_kl_penalty_coef=0.5",
        f"sft_checkpoint={reference / 'sft'}",
        f"rm_checkpoint={peft_rm}",
    )
    assert not (root / "sft").exists() and not (root / "rm").exists()
    records = read_jsonl(root / "rl" / "metrics.jsonl")
    assert len(records) == 1 and abs(records[0]["kl_policy_base"]) < 1e-3  # sampled from the SFT weights
    # the same first iteration as the run that used its own stages (same start, same judge)
    first = read_jsonl(reference / "rl" / "metrics.jsonl")[0]
    assert records[0]["env/all/reward/total"] == first["env/all/reward/total"]


def test_method_both_adds_dpo_and_compares_sft_dpo_rlhf_in_the_report(smoke_run, tmp_path):
    import shutil

    reference, _ = smoke_run
    root = tmp_path / "both"
    for stage in ("sft", "rm", "rl", "tiny_model"):  # finished stages are skipped: only DPO and the comparison run
        shutil.copytree(reference / stage, root / stage)
    result = run_pipeline(root, "method=both")
    assert result.stdout.count("already finished") == 3 and "stage dpo: starting" in result.stdout
    records = read_jsonl(root / "dpo" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]  # smoke: max_steps=3
    assert {"dpo_loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "num_pairs"} <= set(records[0])
    assert abs(records[0]["margin"]) < 1e-3  # the DPO reference is the SFT policy it starts from
    assert (root / "dpo" / "reference_sampler").exists()

    comparison = json.loads((root / "comparison.json").read_text())
    assert list(comparison["policies"]) == ["sft", "dpo", "rlhf"]
    for row in comparison["policies"].values():
        assert 0.0 <= row["win_rate"] <= 1.0 and row["stderr"] >= 0.0 and row["mean_reply_tokens"] > 0
    assert comparison["policies"]["sft"]["kl_from_sft"] == pytest.approx(0.0, abs=1e-3)
    assert comparison["n_prompts"] > 1 and len(comparison["replies"]) == 1  # smoke: report_prompts=1
    assert {"prompt", "human_chosen", "sft", "dpo", "rlhf"} <= set(comparison["replies"][0])
    report = (root / "report.md").read_text()
    assert "## SFT vs DPO vs RLHF" in report and "**DPO:**" in report and (root / "report" / "dpo.png").exists()
    sft = comparison["policies"]["sft"]
    assert f"{100 * sft['win_rate']:.1f}% ± {100 * sft['stderr']:.1f}%" in report
    assert "SFT vs DPO vs RLHF" in (root / "report.html").read_text()


def copy_stages(reference: Path, root: Path, *stages: str) -> None:
    import shutil

    for stage in (*stages, "tiny_model"):
        shutil.copytree(reference / stage, root / stage)


def test_student_t_quantiles_match_the_tables():
    from rlhfkit.utils.stats import student_t_quantile, t_interval

    for df, t in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert student_t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    mean, low, high = t_interval([0.1, 0.3])  # stderr 0.1, t(0.975, 1) = 12.706
    assert mean == pytest.approx(0.2) and (low, high) == pytest.approx((0.2 - 1.27062, 0.2 + 1.27062), abs=1e-4)


def test_out_of_distribution_splits_are_the_offline_splits_the_data_leaves_out():
    from rlhfkit.recipes.preference.rlhf.pipeline_config import parse_args
    from rlhfkit.recipes.preference.rlhf.pipeline_data import out_of_distribution_splits

    def ood(*args: str) -> tuple[str, ...]:
        return out_of_distribution_splits(parse_args(["preset=smoke", *args]))

    assert ood() == ()  # the smoke preset: all four splits
    assert ood("hh_data=harmless-base") == ("helpful-base", "helpful-online", "helpful-rejection-sampled")
    assert ood("pref_data=helpful-base, helpful-online", "hh_data=harmless-base") == (
        "harmless-base",
        "helpful-rejection-sampled",
    )  # pref_data wins over hh_data
    assert ood("hh_data=harmless-base,helpful-base,helpful-online,helpful-rejection-sampled") == ()


def test_preference_model_is_evaluated_out_of_distribution_on_the_splits_it_never_saw(smoke_run, tmp_path):
    """The smoke run's preference model evaluated as if trained on harmless-base only: the other three splits'
    PM-test rows are its out-of-distribution set, the same comparisons `rlhfkit eval pm` reads from them."""
    from rlhfkit.cli import main
    from rlhfkit.report import write_report

    reference, _ = smoke_run
    root = tmp_path / "ood"
    copy_stages(reference, root, "rm")
    (root / "rm" / "pm_eval.json").unlink()
    run_pipeline(root, "run_sft=false", "run_rl=false", "hh_data=harmless-base", "pm_eval_size=6")
    pm_eval = json.loads((root / "rm" / "pm_eval.json").read_text())
    splits = "helpful-base,helpful-online,helpful-rejection-sampled"
    assert pm_eval["ood/splits"] == splits and pm_eval["pm/n"] == 6 and pm_eval["ood/n"] == 6
    for prefix in ("pm", "ood"):
        assert 0 <= pm_eval[f"{prefix}/accuracy_symmetric"] <= 1 and 0 <= pm_eval[f"{prefix}/frac_A"] <= 1
    for data, prefix in (("harmless-base", "pm"), (splits, "ood")):
        out = tmp_path / prefix
        assert (
            main(
                [
                    "eval",
                    "pm",
                    "--model",
                    str(root / "rm"),
                    "--data",
                    data,
                    "--n",
                    "6",
                    "--max-chars",
                    "300",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        expected = json.loads((out / "pm_eval.json").read_text())["metrics"]
        assert {f"{prefix}/{k.removeprefix('pm/')}": v for k, v in expected.items()} == {
            k: v for k, v in pm_eval.items() if k.startswith(f"{prefix}/") and k != "ood/splits"
        }
    report = (Path(write_report(root)["markdown"])).read_text()
    assert "### Judge: content or position?" in report
    assert f"| out of distribution ({splits}) | 6 | {100 * pm_eval['ood/accuracy']:.1f}% [" in report
    assert "| in distribution (harmless-base) | 6 |" in report


def test_scaling_checkpoints_are_evenly_spaced_and_end_with_the_final_one():
    from rlhfkit.checkpoint_utils import CheckpointRecord
    from rlhfkit.recipes.preference.rlhf.pm_scaling import (
        scaling_checkpoints,
        training_comparisons,
        training_steps,
    )

    records = [CheckpointRecord(f"{s:06d}", sampler_path=f"s{s}") for s in (2, 4, 6, 8, 10)]
    records += [CheckpointRecord("000011", state_path="only a state"), CheckpointRecord("final", sampler_path="f")]
    names = [[r.name for r in scaling_checkpoints(records, k)] for k in (1, 2, 3, 6, 9)]
    assert names[:3] == [["final"], ["000002", "final"], ["000002", "000006", "final"]]
    assert names[3] == names[4] == ["000002", "000004", "000006", "000008", "000010", "final"]
    metrics = [{"step": s, "train_mean_nll": 1.0, "num_sequences": 8} for s in range(12)] + [{"step": 0, "x": 1}]
    assert [training_steps(r, metrics) for r in records[:2] + records[-1:]] == [2, 4, 12]
    assert training_comparisons(2, metrics, both_orders=True) == 8  # 2 steps of 8 sequences, each comparison twice
    assert training_comparisons(12, metrics, both_orders=False) == 96


def test_data_scaling_curve_evaluates_the_preference_models_checkpoints(smoke_run, tmp_path):
    """pm_scaling_points=3 on the smoke run's preference model (12 steps, checkpoints every 2): three checkpoints
    judged on pm_eval.json's held-out sets, the last one the final (pm_eval.json's figures), shown by the report; a
    second start evaluates nothing again."""
    from rlhfkit.report import write_report

    reference, _ = smoke_run
    root = tmp_path / "scaling"
    copy_stages(reference, root, "rm")
    (root / "rm" / "pm_eval.json").unlink()
    args = ("run_sft=false", "run_rl=false", "hh_data=harmless-base", "pm_eval_size=6", "pm_scaling_points=3")
    run_pipeline(root, *args)
    pm_eval = json.loads((root / "rm" / "pm_eval.json").read_text())
    points = json.loads((root / "rm" / "pm_scaling.json").read_text())["points"]
    assert [(p["checkpoint"], p["steps"]) for p in points] == [("000002", 2), ("000006", 6), ("final", 12)]
    trained = [r["num_sequences"] for r in read_jsonl(root / "rm" / "metrics.jsonl") if "num_sequences" in r]
    assert [p["comparisons"] for p in points] == [sum(trained[:2]), sum(trained[:6]), sum(trained)]
    assert 0 < points[0]["comparisons"] < points[1]["comparisons"] < points[2]["comparisons"] <= 48  # 4 per step
    assert {k: v for k, v in points[-1].items() if k in pm_eval} == {
        k: v for k, v in pm_eval.items() if k != "ood/splits"
    }
    for p in points:
        assert p["pm/n"] == 6 and p["ood/n"] == 6 and 0 <= p["pm/accuracy"] <= 1 and 0 <= p["ood/frac_A"] <= 1
    assert points[0]["pm/mean_p_correct"] != points[-1]["pm/mean_p_correct"]  # different weights were judged
    result = run_pipeline(root, *args)
    assert "data-scaling curve" not in result.stdout
    assert json.loads((root / "rm" / "pm_scaling.json").read_text())["points"] == points
    report = Path(write_report(root)["markdown"]).read_text()
    assert "### Judge: accuracy against training comparisons" in report
    assert f"| {points[1]['comparisons']} | 6 | {100 * points[1]['pm/accuracy']:.1f}% |" in report
    assert (root / "report" / "pm_scaling.png").exists()


def test_rl_over_two_seeds_gives_the_win_rate_gain_with_a_t_interval(smoke_run, tmp_path):
    from rlhfkit.utils.stats import t_interval

    reference, _ = smoke_run
    root = tmp_path / "seeds"
    copy_stages(reference, root, "sft", "rm")
    result = run_pipeline(root, "run_sft=false", "run_rm=false", "seeds=2")
    assert "stage rl_seed1: starting" in result.stdout and "win-rate gain over 2 seeds" in result.stdout
    # seed 0 is the run's own RL stage, exactly as in the single-seed run
    assert without_timing(read_jsonl(root / "rl" / "metrics.jsonl")) == without_timing(
        read_jsonl(reference / "rl" / "metrics.jsonl")
    )
    summary = json.loads((root / "seeds.json").read_text())
    runs = summary["runs"]
    assert [(r["folder"], r["seed"]) for r in runs] == [("rl", 0), ("rl_seed1", 1)] and summary["n"] == 2
    assert runs[0]["first"] == runs[1]["first"]  # both start from the SFT policy, judged on the same samples
    for run in runs:
        wins = [r["test/win_rate"] for r in read_jsonl(root / run["folder"] / "metrics.jsonl") if "test/win_rate" in r]
        assert run["gain"] == pytest.approx(wins[-1] - wins[0])
    mean, low, high = t_interval([r["gain"] for r in runs])
    assert (summary["mean_gain"], summary["ci_low"], summary["ci_high"]) == pytest.approx((mean, low, high))
    report = (root / "report.md").read_text()
    assert "## RL over seeds" in report and f"{100 * summary['mean_gain']:+.1f} points" in report
    again = run_pipeline(root, "run_sft=false", "run_rm=false", "seeds=2", "report=false")
    assert again.stdout.count("already finished") == 2  # rl and rl_seed1 resume as finished stages
