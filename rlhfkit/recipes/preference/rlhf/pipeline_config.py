"""The pipeline's settings: `PipelineConfig` (every setting typed, with its help text, group and check), the
presets (presets/<name>.toml: config files that ship with rlhfkit, their values explained there), and parsing of
`[preset=NAME] [config=FILE] [key=value ...]` (later ones override earlier ones).

A setting is added in one place: a field of PipelineConfig made with `setting(default, help, group=..., check=...)`;
the command line, `--help`, the config files and the validation pick it up from there.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhfkit import model_info
from rlhfkit.model_files import check_gguf_file, check_model_folder, hub_id_problem, looks_like_hub_id
from rlhfkit.config import (
    ConfigError,
    at_least,
    between,
    existing_path,
    format_help,
    parse_values,
    positive,
    setting,
    split_key_values,
    validate,
)

GROUPS = ("shared", "data", "SFT", "preference model", "RL", "DPO", "engine", "report")
METHODS = {"rlhf": ("sft", "rm", "rl"), "dpo": ("sft", "dpo"), "both": ("sft", "rm", "rl", "dpo")}
SFT_DATA_NAMES = ("lima", "no_robots", "hh_chosen")
# The rule for starting again on a run folder (checked by run_record.py): these settings change how a run is
# started, logged or reported, never what a stage computes, so they may always differ from the recorded ones.
# `sampler` changes where rollouts are computed, not their distribution; `pm_scaling_points` only evaluates saved
# checkpoints. Step counts are not here: the linear learning-rate decay depends on them, and a finished stage is
# not extended.
FREE_TO_CHANGE = (
    "log_root",
    "run_sft",
    "run_rm",
    "run_rl",
    "run_dpo",
    "method",
    "report",
    "report_prompts",
    "pm_scaling_points",
    "wandb_project",
    "wandb_name",
    "num_groups_to_log",
    "sampler",
    "backend",
    "ray_address",
    "num_train_workers",
    "num_samplers",
    "inference_engine",
    "allow_changed_settings",
)
# A stage's own settings (by help group) may also change until the stage has started (its folder exists); the
# preference model's settings also choose DPO's comparisons.
GROUP_STAGES = {"SFT": ("sft",), "preference model": ("rm", "dpo"), "RL": ("rl",), "DPO": ("dpo",)}


@dataclass
class PipelineConfig:
    """Every setting of `rlhfkit pipeline`. A stage's own value (sft_/rm_/rl_...) overrides the shared one when it
    is set; `stage_value` resolves that, in one place."""

    base_model: str = setting(
        "smollm2-135m-instruct",
        "base model: the embedded 'smollm2-135m-instruct', 'tiny' "
        "(a random test model), a model folder, a .gguf file or a Hub id",
    )
    renderer_name: Literal["chat_template", "role_colon"] | None = setting(
        None, "chat renderer; None: the base model's recommended one"
    )
    log_root: str = setting("runs/demo", "run folder: stages write log_root/{sft,rm,rl}; starting again resumes")
    allow_changed_settings: bool = setting(
        False,
        "start on a run folder whose recorded settings (pipeline_config.json) differ: the earlier record is "
        "kept as pipeline_config.N.json. Without it such a start is refused, except for settings that never change "
        f"what a stage computes ({', '.join(FREE_TO_CHANGE[:-1])}) and a stage's own settings before it starts",
    )
    run_sft: bool = setting(True, "run stage 1 (supervised fine-tuning)")
    run_rm: bool = setting(True, "run stage 2 (the pairwise preference model)")
    run_rl: bool = setting(True, "run stage 3 (RL against the preference model)")
    method: Literal["rlhf", "dpo", "both"] = setting(
        "rlhf",
        "rlhf: SFT -> preference model -> RL; dpo: SFT -> DPO from the SFT policy on the preference model's "
        "comparisons (log_root/dpo); both: all four, then SFT, DPO and RLHF compared by the same preference model "
        "(log_root/comparison.json and the report)",
    )
    run_dpo: bool = setting(True, "with method dpo|both: run the DPO stage (`rlhfkit dpo` runs only this one)")
    lora_rank: int = setting(64, "LoRA rank of every stage", check=at_least(1))
    max_length: int = setting(
        16384, "longest training sequence in tokens (SFT and preference model)", check=at_least(8)
    )
    batch_size: int = setting(
        256,
        "SFT rows, preference-model rows and RL groups per step, unless a stage's own *_batch_size is set",
        check=at_least(1),
    )
    save_every: int = setting(
        100, "checkpoint every this many steps in every stage (0: only the final one)", check=at_least(0)
    )
    eval_every: int = setting(
        20, "evaluate every this many steps, unless a stage's own *_eval_every is set (0: off)", check=at_least(0)
    )
    max_steps: int | None = setting(
        None,
        "stop every stage after this many steps, unless a stage's own *_max_steps is set (None: one epoch of the data)",
        check=at_least(0),
    )
    seed: int = setting(0, "seed of the LoRA init, RL sampling and the report's replies")
    wandb_project: str | None = setting(None, "log metrics to this Weights & Biases project (None: off)")
    wandb_name: str = setting("rlhf", "W&B run name prefix (stages append -sft, -rm, -rl)")
    # data
    sft_data: str = setting(
        "lima",
        "SFT conversations: 'lima' (offline), 'no_robots' (Hub), 'hh_chosen' (HH-RLHF "
        "chosen transcripts), or comma-separated files (.jsonl .json .parquet .csv, gzipped too) "
        "or Hub names[:split] with rows of messages, prompt/completion or instruction/input/"
        "output",
        group="data",
    )
    sft_columns: str | None = setting(
        None, "sft_data's column mapping, e.g. prompt=question,completion=answer", group="data"
    )
    pref_data: str | None = setting(
        None,
        "comparisons for the preference model, RL prompts, win-rate prompts and "
        "DPO (split disjointly by prompt), comma-separated: offline HH-RLHF split names "
        "(helpful-base, harmless-base, helpful-online, helpful-rejection-sampled), files "
        "or Hub names[:split] with HH transcripts, TRL prompt/chosen/rejected or "
        "UltraFeedback-binarized rows; None: hh_data",
        group="data",
    )
    pref_columns: str | None = setting(
        None, "pref_data's column mapping, e.g. prompt=question,chosen=good,rejected=bad", group="data"
    )
    hh_data: str | None = setting(
        None,
        "the older name of pref_data, used when pref_data is None (None: all four "
        "offline HH-RLHF splits; 'Anthropic/hh-rlhf': the Hub)",
        group="data",
    )
    hh_max_chars: int | None = setting(
        None,
        "keep only comparisons whose chosen conversation is at most this many characters long (None: all)",
        group="data",
        check=at_least(1),
    )
    # SFT
    sft_learning_rate: float = setting(2e-4, "SFT peak learning rate (linear decay)", group="SFT", check=positive)
    sft_batch_size: int | None = setting(None, "SFT rows per step (None: batch_size)", group="SFT", check=at_least(1))
    sft_max_steps: int | None = setting(None, "SFT steps (None: max_steps)", group="SFT", check=at_least(0))
    sft_eval_every: int | None = setting(
        None, "SFT test NLL every this many steps (0: off; None: eval_every)", group="SFT", check=at_least(0)
    )
    sft_test_size: int = setting(256, "held-out SFT conversations for test/nll", group="SFT", check=at_least(0))
    # preference model
    rm_learning_rate: float = setting(
        3e-4, "preference-model peak learning rate (linear decay)", group="preference model", check=positive
    )
    rm_batch_size: int | None = setting(
        None, "preference-model rows per step (None: batch_size)", group="preference model", check=at_least(1)
    )
    rm_max_steps: int | None = setting(
        None, "preference-model steps (None: max_steps)", group="preference model", check=at_least(0)
    )
    rm_eval_every: int | None = setting(
        None,
        "preference-model test NLL every this many steps (0: off; None: eval_every)",
        group="preference model",
        check=at_least(0),
    )
    pm_test_size: int = setting(
        1024,
        "held-out comparisons for the test/nll curve while the preference model trains",
        group="preference model",
        check=at_least(1),
    )
    pm_eval_size: int = setting(
        400,
        "held-out comparisons for the final evaluation (rm/pm_eval.json), in "
        "distribution and, when the data names only some offline HH-RLHF splits, out of "
        "distribution on the others; capped by the PM-test rows that exist (6% of the "
        "rows). 400: a 95% interval of about +-5 points",
        group="preference model",
        check=at_least(1),
    )
    pm_scaling_points: int = setting(
        0,
        "the data-scaling curve: evaluate this many of the preference model's saved checkpoints (evenly spaced, "
        "the final one included; see save_every) on pm_eval.json's held-out sets, in and out of distribution, "
        "against the number of training comparisons (rm/pm_scaling.json and the report). Points along one run "
        "(earlier ones before the learning rate decayed), each costing one final evaluation; 0: off",
        group="preference model",
        check=at_least(0),
    )
    rm_both_orders: bool = setting(
        False, "train on each comparison in both A/B orders (else one random order)", group="preference model"
    )
    # RL
    rl_learning_rate: float = setting(1e-5, "RL learning rate", group="RL", check=positive)
    rl_batch_size: int | None = setting(
        None, "RL prompts (groups) per iteration (None: batch_size)", group="RL", check=at_least(1)
    )
    rl_max_steps: int | None = setting(None, "RL iterations (None: max_steps)", group="RL", check=at_least(0))
    rl_eval_every: int | None = setting(
        None, "RL win rate every this many iterations (0: off; None: eval_every)", group="RL", check=at_least(0)
    )
    rl_group_size: int = setting(
        4, "replies per prompt, judged in an all-pairs tournament", group="RL", check=at_least(2)
    )
    rl_max_tokens: int = setting(1024, "longest sampled reply in tokens", group="RL", check=at_least(1))
    rl_loss_fn: Literal["importance_sampling", "ppo", "cispo"] = setting(
        "importance_sampling", "policy-gradient loss", group="RL"
    )
    rl_kl_penalty_coef: float = setting(
        0.0,
        "> 0: penalise each reply token's log-ratio to the SFT policy (spec 5.7); 0: off",
        group="RL",
        check=at_least(0),
    )
    reward_mode: Literal["verdict", "probability", "symmetric"] = setting(
        "verdict",
        "reward of a matchup: the judge's greedy A/B verdict (the reference), 2*P(B) - 1, or "
        "'symmetric': both A/B orders judged and their probabilities combined (cancels position bias)",
        group="RL",
    )
    sft_checkpoint: str | None = setting(
        None,
        "the policy RL starts from and its KL reference: an rlhfkit checkpoint, "
        "a stage log folder or a PEFT adapter folder (None: this run's SFT stage)",
        group="RL",
        check=existing_path,
    )
    rm_checkpoint: str | None = setting(
        None,
        "the preference model RL is judged by: an rlhfkit checkpoint, a stage "
        "log folder or a PEFT adapter folder (None: this run's preference model)",
        group="RL",
        check=existing_path,
    )
    win_rate_prompts: int = setting(256, "held-out prompts for test/win_rate", group="RL", check=at_least(1))
    seeds: int = setting(
        1,
        "RL runs from the same SFT policy and judge, with seeds seed, seed+1, ...: the first in "
        "log_root/rl, the others in log_root/rl_seed1, ...; with 2 or more, the win-rate gain (last "
        "minus first test/win_rate) as a mean with a 95% t-interval over seeds goes to "
        "log_root/seeds.json and the report",
        group="RL",
        check=at_least(1),
    )
    num_groups_to_log: int = setting(4, "groups per iteration written to train.html", group="RL", check=at_least(0))
    rl_max_steps_off_policy: int | None = setting(
        None,
        "asynchronous RL: sample and train at once, training on groups sampled up to this many optimizer steps "
        "ago (older ones are sampled again); None: the synchronous loop (the tutorial's)",
        group="RL",
        check=at_least(0),
    )
    rl_stream_minibatches: int | None = setting(
        None,
        "streaming RL: train on each iteration's groups in this many minibatches (one optimizer step each) as "
        "soon as their groups are judged; None: off",
        group="RL",
        check=at_least(1),
    )
    rl_judge: Literal["preference_model", "shorter"] = setting(
        "preference_model",
        "what RL is judged by: this run's preference model, or 'shorter' (the reference's rule-based recipe: the "
        "shorter reply wins; no SFT or preference model needed, RL starts from the base model)",
        group="RL",
    )
    # DPO
    dpo_beta: float = setting(
        0.1, "beta of the DPO loss (the pull towards the SFT policy)", group="DPO", check=positive
    )
    dpo_learning_rate: float = setting(1e-5, "DPO peak learning rate (linear decay)", group="DPO", check=positive)
    dpo_label_smoothing: float = setting(
        0.0,
        "conservative DPO: the assumed share of flipped labels, in [0, 0.5)",
        group="DPO",
        check=between(0.0, 0.499999),
    )
    dpo_loss_type: Literal["sigmoid", "ipo"] = setting("sigmoid", "sigmoid (DPO) or ipo", group="DPO")
    dpo_batch_size: int | None = setting(
        None, "comparisons per DPO step (None: batch_size)", group="DPO", check=at_least(1)
    )
    dpo_max_steps: int | None = setting(None, "DPO steps (None: max_steps)", group="DPO", check=at_least(0))
    dpo_eval_every: int | None = setting(
        None,
        "DPO held-out evaluation every this many steps (0: only the last; None: eval_every)",
        group="DPO",
        check=at_least(0),
    )
    # engine
    sampler: Literal["local", "vllm"] | None = setting(
        None,
        "RL rollouts: 'local' (in this process) or 'vllm' (see README); None: $RLHFKIT_SAMPLER or local",
        group="engine",
    )
    backend: Literal["local", "ray"] | None = setting(
        None,
        "engine backend of every stage: 'local' (this process) or 'ray' (training workers and inference "
        "engines as Ray actors, docs/cluster.md); None: $RLHFKIT_BACKEND or local",
        group="engine",
    )
    ray_address: str | None = setting(
        None,
        "backend=ray: None starts a local Ray instance; 'auto' joins a running cluster; or HOST:PORT",
        group="engine",
    )
    num_train_workers: int | None = setting(
        None,
        "backend=ray: data-parallel training workers (None: one per GPU of the cluster, else 1)",
        group="engine",
        check=at_least(1),
    )
    num_samplers: int | None = setting(
        None, "backend=ray: inference-engine actors (None: 1)", group="engine", check=at_least(1)
    )
    inference_engine: Literal["torch", "vllm"] | None = setting(
        None,
        "backend=ray: the inference engines: 'vllm' (vLLM's native LoRA, every model an adapter of one "
        "engine; compute_logprobs on a torch engine) or 'torch' (the local sampler's code); None: "
        "$RLHFKIT_INFERENCE_ENGINE, else vllm when a Python with vLLM is found, else torch (docs/cluster.md)",
        group="engine",
    )
    # report
    report: bool = setting(True, "when all three stages are finished, write log_root/report.{html,md}", group="report")
    report_prompts: int = setting(
        3,
        "held-out prompts (besides the tutorial's) in the report's reply comparison",
        group="report",
        check=at_least(0),
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.seeds > 1 and self.stage_value("rl", "eval_every") == 0:
            raise ConfigError("seeds", self.seeds, "a win-rate gain per seed needs the RL win rate (rl_eval_every > 0)")
        check_pipeline_files(self)

    def engine_settings(self) -> Any:
        """The one engine value of the run (rlhfkit.engine.EngineSettings): the RLHFKIT_* environment with this
        config's backend/sampler/inference_engine/ray_address/num_* on top. Every stage, builder and evaluation
        of the pipeline gets it; it is recorded in environment.json."""
        from rlhfkit.engine.settings import EngineSettings

        return EngineSettings.from_env(
            backend=self.backend,
            sampler=self.sampler,
            inference_engine=self.inference_engine,
            ray_address=self.ray_address,
            num_train_workers=self.num_train_workers,
            num_samplers=self.num_samplers,
        )

    def stage_value(self, stage: Literal["sft", "rm", "rl", "dpo"], name: str) -> Any:
        """A stage's own setting (e.g. rm_eval_every) if set, else the shared one (eval_every). 0 stays 0."""
        own = getattr(self, f"{stage}_{name}")
        return own if own is not None else getattr(self, name)


def check_pipeline_files(cfg: PipelineConfig) -> None:
    """The files, split names and model names the settings point at exist (before any model or data loads)."""
    check_data_spec("sft_data", cfg.sft_data, dict.fromkeys(SFT_DATA_NAMES))
    for key in ("pref_data", "hh_data"):
        if getattr(cfg, key) is not None:
            check_data_spec(key, getattr(cfg, key), offline_hh_splits())
    if cfg.base_model != "tiny":
        path = Path(cfg.base_model).expanduser()
        looks_like_path = cfg.base_model.startswith((".", "/", "~")) or cfg.base_model.endswith(".gguf")
        if looks_like_path and not path.exists():
            raise ConfigError("base_model", cfg.base_model, "no such model folder or .gguf file")
        if path.is_dir():  # config.json, the architecture, the weights' headers: named before anything loads
            check_model_folder(path, cfg.base_model)
        elif path.is_file() and path.suffix == ".gguf":
            check_gguf_file(path, cfg.base_model)
        if cfg.renderer_name is None:
            try:
                model_info.get_recommended_renderer_name(cfg.base_model)
            except (model_info.ConfigurationError, KeyError) as e:
                # a Hub id that cannot load here (offline, not cached) is the real problem: say that first
                problem = hub_id_problem(cfg.base_model) if looks_like_hub_id(cfg.base_model) else None
                raise ConfigError("base_model", cfg.base_model, problem or f"{e}; or set renderer_name") from None


def offline_hh_splits() -> dict[str, Path]:
    """The offline HH-RLHF splits by name ("helpful-base" -> shared_data_dir()/hh-rlhf/helpful-base-test.jsonl.gz)."""
    from rlhfkit.paths import shared_data_dir
    from rlhfkit.recipes.preference.hh_files import HH_RLHF_FILES

    return {name.removesuffix("-test.jsonl.gz"): shared_data_dir() / "hh-rlhf" / name for name in HH_RLHF_FILES}


def check_data_spec(key: str, spec: str, names: dict[str, Any]) -> None:
    """Each comma-separated item of a data setting is a known name, an existing data file or a Hub name."""
    from rlhfkit.data_sources import parse_source

    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if item in names:
            continue
        try:
            parse_source(item)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(key, spec, f"{e}; or one of {', '.join(names)}") from None


def load_config_file(path_text: str) -> dict[str, Any]:
    """The settings of a .json (e.g. a run's pipeline_config.json) or .toml file, typed."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError("config", path_text, "no such file (expected a .json or .toml file of settings)")
    try:
        text = path.read_text()
        loaded = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, OSError) as e:
        raise ConfigError("config", path_text, f"cannot be read as {path.suffix or 'JSON'} ({e})") from None
    if not isinstance(loaded, dict):
        raise ConfigError("config", path_text, "expected a table/object of settings")
    return parse_values(PipelineConfig, loaded, source=str(path))


PRESETS_DIR = Path(__file__).with_name("presets")  # <name>.toml: the settings of preset=<name>, commented


def load_presets(folder: Path = PRESETS_DIR) -> dict[str, dict[str, Any]]:
    """name -> settings of every `folder/<name>.toml`, read (and typed) as a `config=FILE` is: a preset is a config
    file that ships with rlhfkit, and a copy of one is a valid `config=` file."""
    return {path.stem: load_config_file(str(path)) for path in sorted(folder.glob("*.toml"))}


PRESETS: dict[str, dict[str, Any]] = load_presets()  # read once, on import


def parse_args(argv: list[str]) -> PipelineConfig:
    """The preset (default demo), then each config=FILE, then the key=value arguments; validated."""
    pairs = split_key_values(argv)
    preset = next((v for k, v in reversed(pairs) if k == "preset"), "demo")
    if preset not in PRESETS:
        raise ConfigError("preset", preset, f"expected one of {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[preset])
    for key, value in pairs:
        if key == "config":
            values.update(load_config_file(value))
    overrides = {k: v for k, v in pairs if k not in ("preset", "config")}
    values.update(parse_values(PipelineConfig, overrides))
    return PipelineConfig(**values)


def parse_command(argv: list[str], command: str = "pipeline") -> PipelineConfig | int:
    """The settings of `rlhfkit COMMAND argv...`, or 0 after printing --help. A bad setting raises ConfigError, a
    UserError: `rlhfkit` prints it as one line and exits 2 (nothing loaded or written; --debug: the traceback)."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(command, [a for a in argv if a not in ("-h", "--help")]))
        return 0
    return parse_args(argv)


def help_text(command: str, argv: list[str]) -> str:
    """Usage and every setting, grouped, with defaults and the chosen preset's values."""
    preset = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("preset=")), "demo")
    preset_values = PRESETS.get(preset, {})
    return (
        f"usage: rlhfkit {command} [preset={'|'.join(PRESETS)}] [config=FILE.json|.toml] [key=value ...]\n\n"
        f"Settings apply in order: the preset (default demo), config files, then key=value. A stage's own "
        f"value\n(sft_/rm_/rl_...) overrides the shared one when set. Shown: name (type) = default "
        f"[preset {preset}: value].\nThe presets are commented settings files (to start your own, copy one and "
        f"give preset=NAME config=COPY):\n  {PRESETS_DIR}/NAME.toml\n\n"
        + format_help(PipelineConfig, GROUPS, preset_values, override_label=f"preset {preset}")
    )
