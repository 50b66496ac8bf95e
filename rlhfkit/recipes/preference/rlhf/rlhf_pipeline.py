"""The whole RLHF pipeline in one command: SFT → preference model → RL, then a report (spec §9.1); with
method=dpo|both also DPO from the SFT policy (spec §12).

    python -m rlhfkit.recipes.preference.rlhf.rlhf_pipeline [preset=demo] [config=FILE] [key=value ...]
    rlhfkit pipeline ...                      (the same; --help lists every setting)

This module only composes the stages: each one is the supervised or RL training loop with builders made from the
settings (pipeline_config.py, pipeline_data.py). Stages live in `log_root/{sft,rm,rl,dpo}`. Starting again resumes: a
finished stage (its checkpoints.jsonl has a "final" record) is skipped, a stopped one continues from its last
checkpoint; settings that differ from the folder's recorded ones are refused unless allowed (run_record.py).
After the preference model, its held-out evaluation is written to rm/pm_eval.json (with pm_scaling_points, also
the data-scaling curve over its checkpoints, rm/pm_scaling.json); with seeds=N, RL runs N times
(log_root/rl, rl_seed1, ...) and the win-rate gain over seeds goes to seeds.json; after RL, the replies the report
shows (base, SFT, RLHF) to report_replies.json (and with method=both the SFT/DPO/RLHF comparison to
comparison.json); the report is then written from the run folder alone, and the final win rate printed.
"""

from __future__ import annotations

import functools
import dataclasses
import json
from pathlib import Path
from typing import Any

from rlhfkit import checkpoint_utils, model_info
from rlhfkit.config import environment
from rlhfkit.recipes.preference.rlhf.pipeline_config import METHODS, PRESETS, PipelineConfig, parse_args
from rlhfkit.recipes.preference.rlhf.pipeline_data import (
    comparison_builder,
    held_out_comparisons,
    out_of_distribution_splits,
    sft_dataset_builder,
)
from rlhfkit.recipes.preference.rlhf.pm_scaling import evaluate_checkpoint, evaluate_pm_scaling, held_out_sets
from rlhfkit.recipes.preference.rlhf.seeds import format_seeds, rl_runs, summarize_seeds
from rlhfkit.recipes.preference.rlhf.run_record import CONFIG_FILE, check_recorded_settings, write_record
from rlhfkit.run_files import (
    COMPARISON_FILE,
    DPO_DIR,
    ENVIRONMENT_FILE,
    FINAL_CHECKPOINT,
    PM_EVAL_FILE,
    RL_DIR,
    RM_DIR,
    SFT_DIR,
    STAGE_TIMES_FILE,
    TINY_MODEL_DIR,
)
from rlhfkit.utils.async_utils import run_or_await
from rlhfkit.utils.atomic import write_json_atomic
from rlhfkit.utils.timing import StageClock
from rlhfkit.utils.faults import set_phase
from rlhfkit.utils.run_lock import RunLock

__all__ = ["CONFIG_FILE", "PRESETS", "PipelineConfig", "main", "main_async", "parse_args"]


def stage_finished(log_path: str) -> bool:
    """The stage's last intact checkpoint is its final one (a damaged final checkpoint is redone)."""
    last = checkpoint_utils.get_last_checkpoint(log_path)
    return last is not None and last.name == FINAL_CHECKPOINT


def resolve_base_model(cfg: PipelineConfig) -> str:
    if cfg.base_model != "tiny":
        return cfg.base_model
    from rlhfkit.engine.testing import build_tiny_model  # the smoke preset's random model

    return str(build_tiny_model(Path(cfg.log_root) / TINY_MODEL_DIR))


def starting_point(given: str | None, stage_log: str, key: str) -> str | None:
    """The checkpoint a later stage starts from: `given` (a checkpoint, a stage log directory or a PEFT adapter
    folder) when set, else the `key` path of the last checkpoint in `stage_log` (None if there is none)."""
    if given is None:
        record = checkpoint_utils.get_last_checkpoint(stage_log, required_key=key)
        return None if record is None else record.get(key)
    from rlhfkit.engine.model.lora import is_adapter_folder
    from rlhfkit.sampling_cli import resolve_model

    checkpoint, _, _ = resolve_model(given)
    if checkpoint is None or not is_adapter_folder(checkpoint):
        raise ValueError(f"{given!r}: not an rlhfkit checkpoint, stage log directory or PEFT adapter folder")
    return checkpoint


def check_model(base_model: str) -> None:
    """Raise ModelNotFoundError (one clear line) if `base_model` names no loadable model."""
    from rlhfkit.engine.model.base import resolve_base_model as resolve_engine_model

    resolve_engine_model(base_model)


def check_sampler(cfg: PipelineConfig, base_model: str) -> None:
    """With sampler=vllm: the vLLM engine can serve the base model and put a LoRA adapter on every module the RL
    policy trains, checked before any stage trains (else an error naming the setting to change)."""
    engine = cfg.engine_settings()
    if engine.sampler != "vllm" or not cfg.run_rl or stage_finished(f"{cfg.log_root}/{RL_DIR}"):
        return
    from rlhfkit.engine.model.lora import LoraSpec
    from rlhfkit.engine.model.base import pick_precision
    from rlhfkit.engine.local_backend.vllm_client import check_lora_targets

    check_lora_targets(LoraSpec(base_model, rank=cfg.lora_rank), pick_precision(engine.device, engine.dtype), engine)


def check_data(cfg: PipelineConfig) -> None:
    """Read the run's data once before any stage starts, so a missing file, a truncated .gz or a bad file fails at
    once with an error naming the file and line: the SFT files (named data sets are read by their stage) and the
    comparisons of every role."""
    from rlhfkit.recipes.chat_sl.chat_datasets import NAMED_CHAT_DATA, chat_builder

    if cfg.run_sft and cfg.sft_data not in NAMED_CHAT_DATA and not stage_finished(f"{cfg.log_root}/{SFT_DIR}"):
        chat_builder(None, cfg.sft_data, cfg.sft_columns, cfg.sft_test_size).load_conversations()  # empty: named
    reads_comparisons = cfg.run_rm or cfg.run_dpo or (cfg.run_rl and cfg.rl_judge != "shorter")
    if reads_comparisons and not stage_finished(f"{cfg.log_root}/{RL_DIR}"):
        comparison_builder(cfg, "rl").role_examples()


# --------------------------------------------------------------------------------------------------
# The steps


# Each stage's loop settings are made by a pure function (sft_config, rm_config, rl_config, shorter_rl_config,
# dpo_config): construction only (it validates every field), no model, data or file is read; the run_* step runs
# the loop on them.


def sft_config(cfg: PipelineConfig, base_model: str, renderer_name: str) -> Any:
    """Stage 1's settings: the supervised loop's Config on the SFT conversations."""
    from rlhfkit.renderers import TrainOnWhat
    from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=base_model,
        renderer_name=renderer_name,
        max_length=cfg.max_length,
        batch_size=cfg.stage_value("sft", "batch_size"),
        train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES,
    )
    return supervised_stage_config(
        cfg, "sft", SFT_DIR, base_model, renderer_name, sft_dataset_builder(cfg, common), cfg.sft_learning_rate
    )


async def run_sft(cfg: PipelineConfig, base_model: str, renderer_name: str) -> None:
    from rlhfkit.supervised import train as supervised_train

    await supervised_train.main(sft_config(cfg, base_model, renderer_name))


def rm_config(cfg: PipelineConfig, base_model: str, renderer_name: str) -> Any:
    """Stage 2's settings: the supervised loop's Config on the preference model's comparisons."""
    from rlhfkit.preference.preference_datasets import ChatDatasetBuilderFromComparisons
    from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=base_model,
        renderer_name=renderer_name,
        max_length=cfg.max_length,
        batch_size=cfg.stage_value("rm", "batch_size"),
    )
    comparisons = ChatDatasetBuilderFromComparisons(
        common_config=common,
        comparison_builder=comparison_builder(cfg, "preference_model", cfg.pm_test_size),
        swap=cfg.rm_both_orders,
    )
    return supervised_stage_config(cfg, "rm", RM_DIR, base_model, renderer_name, comparisons, cfg.rm_learning_rate)


def supervised_stage_config(
    cfg: PipelineConfig,
    stage: str,
    folder: str,
    base_model: str,
    renderer_name: str,
    dataset_builder: Any,
    learning_rate: float,
) -> Any:
    """The supervised loop's Config of stage `stage` ("sft" or "rm"): one epoch, linear decay, the run's LoRA
    rank, checkpoint cadence and engine."""
    from rlhfkit.supervised import train as supervised_train

    return supervised_train.Config(
        log_path=f"{cfg.log_root}/{folder}",
        model_name=base_model,
        recipe_name=f"recipe_preference_rlhf_{stage}",
        renderer_name=renderer_name,
        dataset_builder=dataset_builder,
        learning_rate=learning_rate,
        lr_schedule="linear",
        num_epochs=1,
        lora_rank=cfg.lora_rank,
        save_every=cfg.save_every,
        eval_every=cfg.stage_value(stage, "eval_every"),
        wandb_project=cfg.wandb_project,
        wandb_name=f"{cfg.wandb_name}-{stage}",
        max_steps=cfg.stage_value(stage, "max_steps"),
        engine=cfg.engine_settings(),
    )


async def run_rm(cfg: PipelineConfig, base_model: str, renderer_name: str) -> None:
    from rlhfkit.supervised import train as supervised_train

    await supervised_train.main(rm_config(cfg, base_model, renderer_name))


async def evaluate_rm(cfg: PipelineConfig, base_model: str, renderer_name: str) -> dict:
    """The final preference model on held-out comparisons, each judged in both orders: accuracy, order-symmetric
    accuracy, position bias, length bias and P(correct) (pm_eval.PMEvalResult). `pm/...`: up to pm_eval_size
    PM-test comparisons of the run's own data (in distribution); `ood/...`: up to pm_eval_size PM-test comparisons
    of the offline HH-RLHF splits the run's data leaves out (out of distribution, named in `ood/splits`; only
    when the data names some of the offline splits). Saved to rm/pm_eval.json (computed once) and printed."""
    out = Path(cfg.log_root) / RM_DIR / PM_EVAL_FILE
    if out.exists():
        return json.loads(out.read_text())
    record = checkpoint_utils.get_last_checkpoint(f"{cfg.log_root}/{RM_DIR}", required_key="sampler_path")
    sets = held_out_sets(cfg)
    metrics: dict[str, Any] = await evaluate_checkpoint(
        record.sampler_path, renderer_name, base_model, sets, engine=cfg.engine_settings()
    )
    ood_splits = out_of_distribution_splits(cfg)
    if ood_splits:
        metrics["ood/splits"] = ",".join(ood_splits)
    write_json_atomic(out, metrics)
    return metrics


async def run_rl(
    cfg: PipelineConfig, base_model: str, renderer_name: str, folder: str = "rl", seed: int | None = None
) -> None:
    """RL in log_root/`folder` with RL seed `seed` (None: cfg.seed); the win-rate evaluation always uses cfg.seed
    (the same prompts and samples in every seed's run)."""
    from rlhfkit.rl import train as rl_train

    if cfg.rl_judge == "shorter":
        return await run_shorter_rl(cfg, base_model, renderer_name, folder, seed)
    sft_path = starting_point(cfg.sft_checkpoint, f"{cfg.log_root}/{SFT_DIR}", "state_path")
    rm_path = starting_point(cfg.rm_checkpoint, f"{cfg.log_root}/{RM_DIR}", "sampler_path")
    if sft_path is None or rm_path is None:
        raise ValueError(
            f"RL needs the SFT and preference-model checkpoints in {cfg.log_root}/{SFT_DIR} and "
            f"{cfg.log_root}/{RM_DIR}; run those stages first (run_sft=true run_rm=true) or name them "
            f"(sft_checkpoint=PATH rm_checkpoint=PATH)"
        )
    await rl_train.main(rl_config(cfg, base_model, renderer_name, sft_path, rm_path, folder, seed))


def rl_config(
    cfg: PipelineConfig,
    base_model: str,
    renderer_name: str,
    sft_path: str,
    rm_path: str,
    folder: str = "rl",
    seed: int | None = None,
) -> Any:
    """Stage 3's settings (judged by the preference model at `rm_path`, starting from the SFT state at `sft_path`):
    the RL loop's Config, its prompt dataset, judge and win-rate evaluator builders."""
    from rlhfkit.preference.comparison_policy_evaluator import ComparisonEvaluatorBuilder
    from rlhfkit.preference.types import PreferenceModelBuilderFromChatRenderer
    from rlhfkit.rl import preference_envs
    from rlhfkit.rl import train as rl_train

    pm_builder = PreferenceModelBuilderFromChatRenderer(
        renderer_name=renderer_name,
        model_name=base_model,
        rm_weights_path=rm_path,
        reward_mode=cfg.reward_mode,
        engine=cfg.engine_settings(),
    )
    dataset_builder = preference_envs.PairwisePreferenceRLDatasetBuilder(
        comparison_builder=comparison_builder(cfg, "rl"),
        policy_renderer_name=renderer_name,
        policy_model_name=base_model,
        preference_model_builder=pm_builder,
        batch_size=cfg.stage_value("rl", "batch_size"),
        group_size=cfg.rl_group_size,
        tournament_pattern=preference_envs.TournamentPattern.ALL_PAIRS_BOTH_WAYS,
    )
    win_rate = ComparisonEvaluatorBuilder(
        preference_model_builder=pm_builder,
        comparison_builder=comparison_builder(cfg, "rl", cfg.win_rate_prompts),
        renderer_name=renderer_name,
        model_name_for_tokenizer=base_model,
        max_tokens=cfg.rl_max_tokens,
        seed=cfg.seed,
    )
    kl_reference = (
        rl_train.KLReferenceConfig(base_model, load_checkpoint_path=sft_path) if cfg.rl_kl_penalty_coef > 0 else None
    )
    return rl_train.Config(
        model_name=base_model,
        recipe_name="recipe_preference_rlhf_rl",
        renderer_name=renderer_name,
        dataset_builder=dataset_builder,
        load_checkpoint_path=sft_path,
        learning_rate=cfg.rl_learning_rate,
        max_tokens=cfg.rl_max_tokens,
        log_path=f"{cfg.log_root}/{folder}",
        evaluator_builders=[win_rate],
        wandb_project=cfg.wandb_project,
        wandb_name=f"{cfg.wandb_name}-{folder}",
        lora_rank=cfg.lora_rank,
        save_every=cfg.save_every,
        eval_every=cfg.stage_value("rl", "eval_every"),
        num_groups_to_log=cfg.num_groups_to_log,
        max_steps=cfg.stage_value("rl", "max_steps"),
        loss_fn=cfg.rl_loss_fn,
        seed=cfg.seed if seed is None else seed,
        engine=cfg.engine_settings(),
        kl_penalty_coef=cfg.rl_kl_penalty_coef,
        kl_reference_config=kl_reference,
        **rl_execution_mode(cfg),
    )


def rl_execution_mode(cfg: PipelineConfig) -> dict[str, Any]:
    """rl_max_steps_off_policy and rl_stream_minibatches as the RL loop's async/streaming settings (spec 5.8)."""
    from rlhfkit.rl import train as rl_train

    groups = cfg.stage_value("rl", "batch_size")
    mode: dict[str, Any] = {}
    if cfg.rl_max_steps_off_policy is not None:
        mode["async_config"] = rl_train.AsyncConfig(cfg.rl_max_steps_off_policy, groups)
    if cfg.rl_stream_minibatches is not None:
        mode["stream_minibatch_config"] = rl_train.StreamMinibatchConfig(groups, cfg.rl_stream_minibatches)
    return mode


async def run_shorter_rl(
    cfg: PipelineConfig, base_model: str, renderer_name: str, folder: str = "rl", seed: int | None = None
) -> None:
    """The reference's `shorter` recipe (recipes/preference/shorter.py): RL from the base model (or
    sft_checkpoint) on one prompt, judged by the rule that the shorter reply wins; no win-rate evaluation."""
    from rlhfkit.rl import train as rl_train

    sft_path = None if cfg.sft_checkpoint is None else starting_point(cfg.sft_checkpoint, "", "state_path")
    await rl_train.main(shorter_rl_config(cfg, base_model, renderer_name, sft_path, folder, seed))


def shorter_rl_config(
    cfg: PipelineConfig,
    base_model: str,
    renderer_name: str,
    sft_path: str | None = None,
    folder: str = "rl",
    seed: int | None = None,
) -> Any:
    """The `shorter` recipe's RL settings (rl_judge="shorter"), from `sft_path` (None: the base model)."""
    from rlhfkit.recipes.preference.shorter import ShorterComparisonBuilder, ShorterPreferenceModelBuilder
    from rlhfkit.rl import preference_envs
    from rlhfkit.rl import train as rl_train

    return rl_train.Config(
        model_name=base_model,
        recipe_name="recipe_preference_shorter",
        renderer_name=renderer_name,
        dataset_builder=preference_envs.PairwisePreferenceRLDatasetBuilder(
            comparison_builder=ShorterComparisonBuilder(),
            batch_size=cfg.stage_value("rl", "batch_size"),
            policy_renderer_name=renderer_name,
            policy_model_name=base_model,
            preference_model_builder=ShorterPreferenceModelBuilder(),
            group_size=cfg.rl_group_size,
        ),
        load_checkpoint_path=sft_path,
        learning_rate=cfg.rl_learning_rate,
        max_tokens=cfg.rl_max_tokens,
        log_path=f"{cfg.log_root}/{folder}",
        wandb_project=cfg.wandb_project,
        wandb_name=f"{cfg.wandb_name}-{folder}",
        lora_rank=cfg.lora_rank,
        save_every=cfg.save_every,
        eval_every=0,
        num_groups_to_log=cfg.num_groups_to_log,
        max_steps=cfg.stage_value("rl", "max_steps"),
        loss_fn=cfg.rl_loss_fn,
        seed=cfg.seed if seed is None else seed,
        engine=cfg.engine_settings(),
        **rl_execution_mode(cfg),
    )


async def run_dpo(cfg: PipelineConfig, base_model: str, renderer_name: str) -> None:
    """DPO from the SFT policy on the comparisons the preference model trains on (its test split held out)."""
    from rlhfkit.preference import train_dpo

    sft_path = starting_point(cfg.sft_checkpoint, f"{cfg.log_root}/{SFT_DIR}", "state_path")
    if sft_path is None:
        raise ValueError(
            f"DPO starts from the SFT policy in {cfg.log_root}/{SFT_DIR}; run that stage first (run_sft=true) "
            f"or name it (sft_checkpoint=PATH)"
        )
    await train_dpo.main(dpo_config(cfg, base_model, renderer_name, sft_path))


def dpo_config(cfg: PipelineConfig, base_model: str, renderer_name: str, sft_path: str) -> Any:
    """The DPO stage's settings: the DPO loop's Config from the SFT state at `sft_path`."""
    from rlhfkit.preference import train_dpo
    from rlhfkit.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=base_model,
        renderer_name=renderer_name,
        max_length=cfg.max_length,
        batch_size=cfg.stage_value("dpo", "batch_size"),
    )
    return train_dpo.Config(
        log_path=f"{cfg.log_root}/{DPO_DIR}",
        model_name=base_model,
        recipe_name="recipe_preference_dpo",
        renderer_name=renderer_name,
        load_checkpoint_path=sft_path,
        dataset_builder=DPODatasetBuilderFromComparisons(
            common, comparison_builder(cfg, "preference_model", cfg.pm_test_size)
        ),
        learning_rate=cfg.dpo_learning_rate,
        dpo_beta=cfg.dpo_beta,
        label_smoothing=cfg.dpo_label_smoothing,
        loss_type=cfg.dpo_loss_type,
        lora_rank=cfg.lora_rank,
        save_every=cfg.save_every,
        eval_every=cfg.stage_value("dpo", "eval_every"),
        wandb_project=cfg.wandb_project,
        wandb_name=f"{cfg.wandb_name}-dpo",
        max_steps=cfg.stage_value("dpo", "max_steps"),
        engine=cfg.engine_settings(),
    )


async def compare_sft_dpo_rlhf(cfg: PipelineConfig, base_model: str, renderer_name: str) -> dict:
    """SFT, DPO and RLHF policies on the win-rate prompts, judged by the run's preference model; written to
    log_root/comparison.json (computed once)."""
    from rlhfkit.engine import ServiceClient
    from rlhfkit.preference.policy_comparison import compare_policies
    from rlhfkit.preference.types import PreferenceModelBuilderFromChatRenderer
    from rlhfkit.renderers import get_renderer
    from rlhfkit.tokenizer_utils import get_tokenizer

    out = Path(cfg.log_root) / COMPARISON_FILE
    if out.exists():
        return json.loads(out.read_text())
    # the local sampler: the comparison also needs compute_logprobs (KL from SFT)
    engine = dataclasses.replace(cfg.engine_settings(), sampler=None)
    service = ServiceClient(settings=engine)
    paths = {
        name: checkpoint_utils.get_last_checkpoint(f"{cfg.log_root}/{stage}", required_key="sampler_path").sampler_path
        for name, stage in (("sft", SFT_DIR), ("dpo", DPO_DIR), ("rlhf", RL_DIR))
    }
    rm = checkpoint_utils.get_last_checkpoint(f"{cfg.log_root}/{RM_DIR}", required_key="sampler_path")
    preference_model = PreferenceModelBuilderFromChatRenderer(
        renderer_name, base_model, rm.sampler_path, reward_mode=cfg.reward_mode, engine=engine
    )()
    comparisons = [c.comparison for c in held_out_comparisons(cfg, "rl", cfg.win_rate_prompts)]
    print(f"[rlhfkit] comparing the SFT, DPO and RLHF policies on {len(comparisons)} held-out prompts")
    result = await compare_policies(
        {name: service.create_sampling_client(model_path=path, base_model=base_model) for name, path in paths.items()},
        "sft",
        preference_model,
        comparisons,
        get_renderer(renderer_name, get_tokenizer(base_model)),
        max_tokens=cfg.rl_max_tokens,
        seed=cfg.seed,
        replies_to_keep=cfg.report_prompts,
    )
    result["checkpoints"] = {**paths, "preference_model": rm.sampler_path}
    write_json_atomic(out, result)
    for name, row in result["policies"].items():
        print(
            f"[rlhfkit]   {name:5s} win rate {100 * row['win_rate']:.1f}% ± {100 * row['stderr']:.1f}%, "
            f"{row['mean_reply_tokens']:.1f} reply tokens, KL from SFT {row['kl_from_sft']:.2f} nats/reply"
        )
    return result


def write_settings(cfg: PipelineConfig) -> None:
    """pipeline_config.json (every setting; an earlier, different record is kept as pipeline_config.N.json) and
    environment.json (the run's engine settings, as every stage gets them, and the environment variables that
    change rlhfkit's behaviour)."""
    kept = write_record(cfg)
    if kept is not None:
        print(f"[rlhfkit] the settings differ from the run's earlier ones, kept in {kept}")
    record = {**environment(), "engine": cfg.engine_settings().record()}
    write_json_atomic(Path(cfg.log_root) / ENVIRONMENT_FILE, record)


async def main_async(cfg: PipelineConfig) -> dict[str, float]:
    """Run the configured stages (skipping finished ones) and write the report; returns stage wall times. Settings
    that differ from the folder's recorded ones are refused first (run_record.py)."""
    check_recorded_settings(cfg)
    with RunLock(cfg.log_root):
        check_recorded_settings(cfg)  # again under the lock: another run may have recorded settings meanwhile
        return await _run_stages(cfg)


async def _run_stages(cfg: PipelineConfig) -> dict[str, float]:
    write_settings(cfg)
    root = Path(cfg.log_root)
    base_model = resolve_base_model(cfg)
    check_model(base_model)  # a bad model path or data file fails here, before any stage starts
    check_data(cfg)
    check_sampler(cfg, base_model)
    renderer_name = cfg.renderer_name or model_info.get_recommended_renderer_name(base_model)
    timings_path = root / STAGE_TIMES_FILE
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    rl_seeds = rl_runs(cfg.seed, cfg.seeds)
    stages = [
        (SFT_DIR, "sft", cfg.run_sft, run_sft),
        (RM_DIR, "rm", cfg.run_rm, run_rm),
        *[(folder, "rl", cfg.run_rl, functools.partial(run_rl, folder=folder, seed=seed)) for folder, seed in rl_seeds],
        (DPO_DIR, "dpo", cfg.run_dpo, run_dpo),
    ]
    for name, stage, enabled, run in stages:
        if not enabled or stage not in METHODS[cfg.method]:
            continue
        set_phase(name)
        if stage_finished(f"{cfg.log_root}/{name}"):
            print(f"[rlhfkit] stage {name}: already finished in {cfg.log_root}/{name}, skipping")
        else:
            print(f"[rlhfkit] stage {name}: starting ({cfg.log_root}/{name})")
            with StageClock(timings_path, timings, name):
                await run(cfg, base_model, renderer_name)
        if name == "rm":
            set_phase("pm_eval")
            final_metrics = await evaluate_rm(cfg, base_model, renderer_name)
            if cfg.pm_scaling_points > 0:
                await evaluate_pm_scaling(cfg, base_model, renderer_name, final_metrics)
    if len(rl_seeds) > 1 and all(stage_finished(f"{cfg.log_root}/{folder}") for folder, _ in rl_seeds):
        print(f"[rlhfkit] {format_seeds(summarize_seeds(cfg.log_root, rl_seeds))}")
    if cfg.method == "both" and all(stage_finished(f"{cfg.log_root}/{s}") for s in METHODS["both"]):
        await compare_sft_dpo_rlhf(cfg, base_model, renderer_name)
    set_phase("report")
    if cfg.report and all(stage_finished(f"{cfg.log_root}/{s}") for s in (SFT_DIR, RM_DIR, RL_DIR)):
        from rlhfkit.recipes.preference.rlhf.report_replies import sample_report_replies
        from rlhfkit.report import write_report

        await sample_report_replies(cfg, base_model, renderer_name)
        paths = write_report(cfg.log_root)
        print(f"[rlhfkit] report: {paths['html']}  and  {paths['markdown']}")
    from rlhfkit.report import final_win_rate

    win_rate = final_win_rate(cfg.log_root)
    if win_rate is not None and cfg.run_rl and "rl" in METHODS[cfg.method]:
        print(f"[rlhfkit] {win_rate}")
    return timings


def main(cfg: PipelineConfig) -> Any:
    """Runs to completion outside an event loop; inside one, returns a coroutine to await."""
    return run_or_await(main_async(cfg))
