"""The presets are files (rlhfkit/recipes/preference/rlhf/presets/<name>.toml) read by the reader of config=FILE:
preset=NAME is its file over the defaults, a copy of a preset file is a valid config=FILE, and every stage of every
preset builds its loop settings (construction only: no model is loaded, no data read, nothing trained), so a
preset that names an unknown setting, or a value that a stage's own Config rejects, fails here."""

import shutil
import tomllib
from pathlib import Path

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.recipes.preference.rlhf import rlhf_pipeline
from rlhfkit.recipes.preference.rlhf.pipeline_config import (
    PRESETS,
    PRESETS_DIR,
    PipelineConfig,
    help_text,
    load_presets,
    parse_args,
)
from rlhfkit.recipes.preference.rlhf.seeds import rl_runs


def test_the_presets_are_the_files_of_the_presets_folder():
    files = sorted(PRESETS_DIR.glob("*.toml"))
    assert list(PRESETS) == [path.stem for path in files]
    assert {"demo", "quality", "shorter", "smoke", "tutorial"} <= set(PRESETS)
    usage = help_text("rl", [])
    assert f"[preset={'|'.join(PRESETS)}]" in usage and f"{PRESETS_DIR}/NAME.toml" in usage  # the folder's presets
    with pytest.raises(ConfigError, match="expected one of demo, quality, shorter, smoke, tutorial"):
        parse_args(["preset=huge"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_is_its_file_over_the_defaults(name):
    """The file's own values (read here with tomllib, not by rlhfkit's reader) on top of PipelineConfig's
    defaults: nothing else goes into a preset."""
    path = PRESETS_DIR / f"{name}.toml"
    values = tomllib.loads(path.read_text())
    assert values, path
    assert parse_args([f"preset={name}"]) == PipelineConfig(**values)
    assert parse_args([f"preset={name}", f"config={path}"]) == parse_args([f"preset={name}"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_copy_of_a_preset_file_is_a_users_config_file(name, tmp_path):
    """A preset file copied and edited (its comments kept) is read by config=FILE; the edit wins."""
    mine = tmp_path / "mine.toml"
    shutil.copy(PRESETS_DIR / f"{name}.toml", mine)
    text = mine.read_text()
    assert "\n#" in "\n" + text  # the values are explained in the file
    mine.write_text(text.replace('log_root = "', 'log_root = "mine/', 1))
    expected = parse_args([f"preset={name}", f"log_root=mine/{PRESETS[name]['log_root']}"])
    assert parse_args([f"preset={name}", f"config={mine}"]) == expected
    if name == "demo":  # the default preset: the copy alone re-creates it
        assert parse_args([f"config={mine}"]) == expected


def renderer_of(cfg: PipelineConfig) -> str:
    """The renderer the pipeline would use, without building the tiny model (whose template is a chat template)."""
    from rlhfkit import model_info

    if cfg.renderer_name is not None:
        return cfg.renderer_name
    return "chat_template" if cfg.base_model == "tiny" else model_info.get_recommended_renderer_name(cfg.base_model)


def build_every_stage(cfg: PipelineConfig) -> dict:
    """Each stage's loop Config as the pipeline makes it (rlhf_pipeline.*_config), from stand-in checkpoint paths:
    SFT, the preference model, every RL seed's run (with the run's judge) and DPO."""
    base, renderer = cfg.base_model, renderer_of(cfg)
    configs = {
        "sft": rlhf_pipeline.sft_config(cfg, base, renderer),
        "rm": rlhf_pipeline.rm_config(cfg, base, renderer),
        "dpo": rlhf_pipeline.dpo_config(cfg, base, renderer, sft_path="/sft/state"),
    }
    for folder, seed in rl_runs(cfg.seed, cfg.seeds):
        if cfg.rl_judge == "shorter":
            configs[folder] = rlhf_pipeline.shorter_rl_config(cfg, base, renderer, None, folder, seed)
        else:
            configs[folder] = rlhf_pipeline.rl_config(cfg, base, renderer, "/sft/state", "/rm/sampler", folder, seed)
    return configs


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_stage_of_every_preset_builds(name):
    from rlhfkit.utils.ml_log import dump_run_config

    cfg = parse_args([f"preset={name}"])
    configs = build_every_stage(cfg)
    for stage in ("sft", "rm", "dpo"):
        config = configs[stage]
        assert config.log_path == f"{cfg.log_root}/{stage}"
        assert config.learning_rate == getattr(cfg, f"{stage}_learning_rate")
        assert config.max_steps == cfg.stage_value(stage, "max_steps")
        assert config.eval_every == cfg.stage_value(stage, "eval_every")
        assert config.dataset_builder.common_config.batch_size == cfg.stage_value(stage, "batch_size")
        assert config.lora_rank == cfg.lora_rank and config.save_every == cfg.save_every
    assert configs["rm"].dataset_builder.swap == cfg.rm_both_orders
    assert configs["dpo"].dpo_beta == cfg.dpo_beta and configs["dpo"].loss_type == cfg.dpo_loss_type
    rl = configs["rl"]
    assert rl.learning_rate == cfg.rl_learning_rate and rl.max_tokens == cfg.rl_max_tokens
    assert rl.dataset_builder.batch_size == cfg.stage_value("rl", "batch_size")
    assert rl.dataset_builder.group_size == cfg.rl_group_size
    if cfg.rl_judge == "shorter":
        assert rl.load_checkpoint_path is None and rl.eval_every == 0 and not rl.evaluator_builders
    else:
        (win_rate,) = rl.evaluator_builders
        assert win_rate.comparison_builder.test_size == cfg.win_rate_prompts
        assert rl.dataset_builder.preference_model_builder.reward_mode == cfg.reward_mode
        assert (rl.kl_reference_config is not None) == (cfg.rl_kl_penalty_coef > 0)
    for config in configs.values():
        dump_run_config(config)  # the stage's config.json is written from these at its start


def write_preset(folder: Path, extra: str) -> dict:
    """A presets folder holding smoke.toml plus `extra` lines, loaded as the pipeline loads its own."""
    folder.mkdir()
    (folder / "smoke.toml").write_text((PRESETS_DIR / "smoke.toml").read_text() + extra)
    return load_presets(folder)


def test_a_preset_naming_an_unknown_setting_fails(tmp_path):
    with pytest.raises(ConfigError, match=r"smoke\.toml: rl_stream_minibatch=2: unknown setting; did you mean"):
        write_preset(tmp_path / "presets", "rl_stream_minibatch = 2\n")


@pytest.mark.parametrize(
    "extra,key",
    [
        ("rl_stream_minibatches = 8\n", "num_minibatches"),  # more minibatches than the batch's 4 groups
        ('dpo_loss_type = "ipo"\ndpo_label_smoothing = 0.1\n', "label_smoothing"),  # smoothing is sigmoid-only
        ("dpo_max_steps = 0\n", "max_steps"),  # DPO runs at least one step
    ],
)
def test_a_preset_value_that_a_stage_rejects_fails(tmp_path, extra, key):
    """Values every PipelineConfig check passes, but a stage's own Config refuses."""
    values = write_preset(tmp_path / "presets", extra)["smoke"]
    cfg = PipelineConfig(**values)
    with pytest.raises(ConfigError) as error:
        build_every_stage(cfg)
    assert error.value.key == key
