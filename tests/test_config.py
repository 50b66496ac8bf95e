"""Settings: every preset parses and validates, --help documents every field, bad values exit 2 fast and name
the key without touching the run folder, 0 turns a stage's evaluation off, config.json round trips, and the report
is written from a finished run folder alone."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.recipes.preference.rlhf.pipeline_config import GROUPS, PRESETS, PipelineConfig, parse_args

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def rlhfkit(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", *args], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_parses_and_validates(preset):
    cfg = parse_args([f"preset={preset}"])
    for key, value in PRESETS[preset].items():
        assert getattr(cfg, key) == value


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_presets_rl_stage_builds_its_judge(preset, monkeypatch):
    """The RL stage's configuration is built from each preset (its reward mode included), the loop captured
    instead of run."""
    import asyncio

    from rlhfkit.recipes.preference.rlhf import rlhf_pipeline
    from rlhfkit.rl import train as rl_train

    seen = []

    async def capture(config):
        seen.append(config)

    monkeypatch.setattr(rl_train, "main", capture)
    monkeypatch.setattr(rlhf_pipeline, "starting_point", lambda given, stage_log, key: f"{stage_log}/{key}")
    cfg = parse_args([f"preset={preset}"])
    asyncio.run(rlhf_pipeline.run_rl(cfg, cfg.base_model, "chat_template"))
    (config,) = seen
    assert config.dataset_builder.preference_model_builder.reward_mode == cfg.reward_mode


def test_every_field_has_a_help_text_and_a_known_group():
    for f in dataclasses.fields(PipelineConfig):
        assert f.metadata.get("help"), f.name
        assert f.metadata.get("group") in GROUPS, f.name


@pytest.mark.parametrize("command", ["pipeline", "sft", "rm", "rl"])
def test_help_of_each_command_lists_every_field_with_its_help(command):
    result = rlhfkit(command, "--help")
    assert result.returncode == 0, result.stderr
    for f in dataclasses.fields(PipelineConfig):
        assert f"  {f.name} (" in result.stdout, f.name
        assert f.metadata["help"][:60] in result.stdout.replace("\n      ", " "), f.name
    for group in GROUPS:
        assert f"{group}:" in result.stdout
    assert "[preset demo: 16]" in result.stdout  # lora_rank of the default preset
    assert "[preset smoke: 4]" in rlhfkit(command, "--help", "preset=smoke").stdout


def test_top_level_help_lists_the_commands_and_settings():
    result = rlhfkit("--help")
    assert result.returncode == 0 and "rlhfkit pipeline" in result.stdout and "sft_eval_every" in result.stdout


BAD = [  # (arguments, key named in the message, a piece of what is accepted)
    (["sft_eval_evry=0"], "sft_eval_evry", "did you mean sft_eval_every"),
    (["reward_mode=verdit"], "reward_mode", "'verdict' | 'probability'"),
    (["rl_loss_fn=reinforce"], "rl_loss_fn", "importance_sampling"),
    (["sampler=gpu"], "sampler", "'local' | 'vllm'"),
    (["lora_rank=big"], "lora_rank", "expected an integer"),
    (["run_rl=maybe"], "run_rl", "true or false"),
    (["rl_learning_rate=0"], "rl_learning_rate", "> 0"),
    (["rl_group_size=1"], "rl_group_size", ">= 2"),
    (["max_steps=-1"], "max_steps", ">= 0"),
    (["sft_data=/no/such/file.jsonl"], "sft_data", "data file not found"),
    (["hh_data=harmless-bass"], "hh_data", "harmless-base"),
    (["pref_data=/no/such/file.parquet"], "pref_data", "data file not found"),
    (["base_model=/no/such/model"], "base_model", "no such model folder"),
    (["config=/no/such/config.json"], "config", "no such file"),
    (["preset=huge"], "preset", "demo"),
    (["lora_rank"], "lora_rank", "key=value"),
]


@pytest.mark.parametrize("args,key,accepted", BAD, ids=[b[1] + ":" + b[0][0] for b in BAD])
def test_a_bad_value_exits_2_naming_the_key_fast_and_writes_nothing(tmp_path, args, key, accepted):
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline_config.json").write_text("{}")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    start = time.monotonic()
    result = rlhfkit("pipeline", f"log_root={run}", *args)
    assert time.monotonic() - start < 5
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert key in lines[0] and accepted in lines[0], lines[0]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_the_stage_commands_report_bad_values_too():
    result = rlhfkit("rl", "reward_mode=verdit")
    assert result.returncode == 2 and result.stderr.startswith("rlhfkit: error: reward_mode=")


def test_bad_values_in_python_raise_config_error():
    with pytest.raises(ConfigError) as e:
        PipelineConfig(rl_group_size=1)
    assert e.value.key == "rl_group_size" and e.value.value == 1
    with pytest.raises(ConfigError):
        PipelineConfig(reward_mode="probabilty")
    assert PipelineConfig(rm_learning_rate=1).rm_learning_rate == 1.0  # ints are accepted for floats


@pytest.mark.parametrize("stage", ["sft", "rm", "rl"])
def test_zero_turns_a_stages_evaluation_off(stage):
    cfg = parse_args(["preset=smoke", f"{stage}_eval_every=0"])
    assert cfg.eval_every == 2 and cfg.stage_value(stage, "eval_every") == 0
    others = {"sft", "rm", "rl"} - {stage}
    assert all(cfg.stage_value(other, "eval_every") == 2 for other in others)
    assert parse_args(["preset=smoke", f"{stage}_max_steps=0"]).stage_value(stage, "max_steps") == 0


def test_zero_eval_every_reaches_the_training_loops(monkeypatch):
    """The values the pipeline hands to the stage loops (captured instead of training)."""
    import asyncio

    from rlhfkit.recipes.preference.rlhf import rlhf_pipeline
    from rlhfkit.supervised import train as supervised_train

    seen = {}

    async def capture(config):
        seen[config.log_path.rsplit("/", 1)[-1]] = config

    monkeypatch.setattr(supervised_train, "main", capture)
    cfg = parse_args(["preset=demo", "sft_eval_every=0", "rm_eval_every=0"])
    asyncio.run(rlhf_pipeline.run_sft(cfg, "smollm2-135m-instruct", "chat_template"))
    asyncio.run(rlhf_pipeline.run_rm(cfg, "smollm2-135m-instruct", "chat_template"))
    assert seen["sft"].eval_every == 0 and seen["rm"].eval_every == 0


def test_a_run_is_recreated_from_its_written_config(tmp_path):
    from rlhfkit.recipes.preference.rlhf.rlhf_pipeline import CONFIG_FILE, ENVIRONMENT_FILE, write_settings

    cfg = parse_args(
        [
            "preset=demo",
            f"log_root={tmp_path}",
            "rl_eval_every=0",
            "sampler=local",
            "renderer_name=role_colon",
            "rl_learning_rate=3e-5",
        ]
    )
    write_settings(cfg)
    again = parse_args([f"config={tmp_path / CONFIG_FILE}"])
    assert again == cfg
    assert parse_args(["preset=smoke", f"config={tmp_path / CONFIG_FILE}"]) == cfg  # the file overrides the preset
    from rlhfkit.config import environment

    recorded = json.loads((tmp_path / ENVIRONMENT_FILE).read_text())
    assert recorded == {**environment(), "engine": cfg.engine_settings().record()}
    assert recorded["engine"]["sampler"] == "local"  # the run's one engine value, as its stages get it
    toml = tmp_path / "settings.toml"
    toml.write_text("preset_free = 1\n")
    with pytest.raises(ConfigError, match="preset_free"):
        parse_args([f"config={toml}"])


def test_stage_config_json_records_the_builders_completely(tmp_path):
    from rlhfkit.preference.comparison_policy_evaluator import ComparisonEvaluatorBuilder
    from rlhfkit.preference.types import PreferenceModelBuilderFromChatRenderer
    from rlhfkit.recipes.preference.rlhf.pipeline_data import comparison_builder
    from rlhfkit.rl.preference_envs import PairwisePreferenceRLDatasetBuilder
    from rlhfkit.utils.ml_log import dump_run_config

    cfg = parse_args(["preset=demo"])
    pm = PreferenceModelBuilderFromChatRenderer("chat_template", "m", "/weights", reward_mode="probability")
    builder = PairwisePreferenceRLDatasetBuilder(comparison_builder(cfg, "rl"), 4, "chat_template", "m", pm, 4)
    evaluator = ComparisonEvaluatorBuilder(pm, comparison_builder(cfg, "rl", 32), "chat_template", "m", 48)
    dumped = dump_run_config({"dataset_builder": builder, "evaluator_builders": [evaluator]})
    text = json.dumps(dumped)
    assert '"reward_mode": "probability"' in text and '"max_chars": 400' in text and '"test_size": 32' in text
    assert dumped["dataset_builder"]["preference_model_builder"]["rm_weights_path"] == "/weights"
    assert dumped["evaluator_builders"][0]["__class__"].endswith("ComparisonEvaluatorBuilder")
    with pytest.raises(dataclasses.FrozenInstanceError):
        builder.batch_size = 8


def test_compatibility_parameters_warn_when_set(caplog):
    from rlhfkit.compat import warn_ignored

    with caplog.at_level("WARNING"):
        warn_ignored("test_owner", ttl_seconds=604800, submit_ahead=1)
        assert not caplog.records
        warn_ignored("test_owner", ttl_seconds=60)
    assert "ttl_seconds=60 is ignored" in caplog.text


def test_the_report_is_written_from_a_run_folder_alone(tmp_path):
    """A finished run's files (no checkpoints, no model): the report reads them in a fresh process that never
    imports the engine, torch or transformers."""
    root = tmp_path / "run"
    for stage, key in (("sft", "test/nll"), ("rm", "test/nll"), ("rl", "test/win_rate")):
        (root / stage).mkdir(parents=True)
        rows = [{"step": s, key: 0.5 + 0.1 * s, "train_mean_nll": 1.0, "learning_rate": 1e-4} for s in range(3)]
        (root / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "pipeline_config.json").write_text(json.dumps({"base_model": "my-model"}))
    (root / "stage_times.json").write_text(json.dumps({"sft": 60.0, "rm": 120.0, "rl": 30.0}))
    (root / "report_replies.json").write_text(
        json.dumps(
            {
                "base_model": "my-model",
                "renderer_name": "role_colon",
                "replies": [{"prompt": [{"role": "user", "content": "Hi?"}], "base": "base says", "rlhf": "rlhf says"}],
            }
        )
    )
    code = (
        "import sys; from rlhfkit.report import write_report; write_report(sys.argv[1]); "
        "assert not {'torch', 'transformers', 'rlhfkit.engine'} & set(sys.modules), sorted(sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(root)], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (root / "report.md").read_text()
    assert "my-model" in report and "rlhf says" in report and "user: Hi?" in report and "sft 1.0 min" in report
    assert "70.0%" in report  # the last win rate
    assert (root / "report.html").exists() and (root / "report" / "rl.png").exists()
    assert rlhfkit("report", str(root)).returncode == 0


def test_renderer_choices_are_the_registered_renderers():
    import typing

    from rlhfkit.config import field_types
    from rlhfkit.renderers import RENDERERS

    choices = typing.get_args(typing.get_args(field_types(PipelineConfig)["renderer_name"])[0])
    assert set(choices) == set(RENDERERS)


def test_changed_settings_are_refused_unless_free_or_of_a_stage_not_started(tmp_path):
    from rlhfkit.recipes.preference.rlhf.run_record import (
        SettingsChangedError,
        check_recorded_settings,
        read_record,
        refused_differences,
        write_record,
    )

    cfg = parse_args(["preset=smoke", f"log_root={tmp_path}"])
    assert write_record(cfg) is None
    (tmp_path / "sft").mkdir()  # SFT started; the preference model, RL and DPO have not
    recorded = read_record(tmp_path)
    free = parse_args(
        [
            "preset=smoke",
            f"log_root={tmp_path}",
            "report=false",
            "run_sft=false",
            "method=both",
            "wandb_project=x",
            "sampler=local",
            "rl_max_steps=7",
            "rm_learning_rate=1e-2",
            "dpo_beta=0.3",
        ]
    )
    assert refused_differences(recorded, free) == {}
    check_recorded_settings(free)
    changed = parse_args(
        ["preset=smoke", f"log_root={tmp_path}", "lora_rank=32", "sft_learning_rate=1", "rl_max_steps=7"]
    )
    assert refused_differences(recorded, changed) == {"lora_rank": (4, 32), "sft_learning_rate": (2e-4, 1.0)}
    (tmp_path / "rl").mkdir()
    assert refused_differences(recorded, changed)["rl_max_steps"] == (None, 7)
    with pytest.raises(
        SettingsChangedError,
        match=r"lora_rank: 4 → 32; sft_learning_rate: 0.0002 → 1.0; "
        r"rl_max_steps: None → 7\. .*allow_changed_settings=true",
    ):
        check_recorded_settings(changed)
    allowed = parse_args(["preset=smoke", f"log_root={tmp_path}", "lora_rank=32", "allow_changed_settings=true"])
    check_recorded_settings(allowed)
    assert write_record(allowed) == tmp_path / "pipeline_config.1.json"
    assert write_record(allowed) is None  # unchanged: nothing more kept
    assert read_record(tmp_path)["lora_rank"] == 32 and "allow_changed_settings" not in read_record(tmp_path)
    assert json.loads((tmp_path / "pipeline_config.1.json").read_text()) == recorded
    assert parse_args([f"config={tmp_path / 'pipeline_config.json'}"]).allow_changed_settings is False
