"""The names of the files and folders of a run folder, each named once here (stdlib only: the report and the
command line read it without the engine). Writers and readers build paths from these names; the layout:

    log_root/                         the run folder (`rlhfkit pipeline log_root=...`; also `rlhfkit report`'s)
      .rlhfkit.lock                   LOCK_FILE: held (flock) while a run writes here; names the holder
                                      (utils/run_lock.py)
      pipeline_config.json            PIPELINE_CONFIG_FILE: every setting of the run (run_record.py); read when
                                      the run starts again (changed settings are refused), by config=FILE, the
                                      report, `rlhfkit report` and `rlhfkit sample` (to recognise a run folder)
      pipeline_config.N.json          kept_pipeline_config_file(N): an earlier, different record (run_record.py)
      environment.json                ENVIRONMENT_FILE: the RLHFKIT_* and library environment variables and the
                                      run's engine settings (rlhf_pipeline.write_settings)
      stage_times.json                STAGE_TIMES_FILE: {stage folder: wall seconds}, summed over resumed runs
                                      (utils/timing.StageClock, from the pipeline); read by the report
      tiny_model/                     TINY_MODEL_DIR: base_model=tiny's random model (rlhf_pipeline)
      seeds.json                      SEEDS_FILE: the win-rate gain over RL seeds (seeds.py); read by the report
      comparison.json                 COMPARISON_FILE: SFT vs DPO vs RLHF, method=both (rlhf_pipeline); report
      report_replies.json             REPORT_REPLIES_FILE: the replies the report shows (report_replies.py)
      report.md, report.html          REPORT_MD_FILE, REPORT_HTML_FILE: the report (report.py)
      report/                         REPORT_DIR: its figures, stage_figure(stage) (sft.png, rm.png, rl.png,
                                      dpo.png), PM_SCALING_FIGURE, RL_TIMELINE_FIGURE (report.py)
      sft/ rm/ rl/ dpo/               SFT_DIR, RM_DIR, RL_DIR, DPO_DIR: each stage's log folder, named by its
      rl_seed1/ ...                   stage; rl_seed_dir(k): RL with seed+k (seeds.py; k=0 is rl/)

    a stage's log folder (any training loop's log_path: the supervised, RL and DPO loops):
      .rlhfkit.lock                   LOCK_FILE: held while the loop writes here (a stage run alone, too)
      config.json                     STAGE_CONFIG_FILE: the loop's Config with its builders (utils/ml_log.py);
                                      read by the report (RL's mode) and `rlhfkit sample` (the renderer)
      environment.json                ENVIRONMENT_FILE: the environment variables at the stage's start (ml_log)
      metrics.jsonl                   METRICS_FILE: one row per step (ml_log.MetricsLogger; cut back on resume);
                                      read by the report, seeds.py and pm_scaling.py
      metrics.png                     METRICS_PLOT: its curves (ml_log)
      logs.log                        LOG_FILE: the stage's log (ml_log)
      code.diff                       CODE_DIFF_FILE: rlhfkit's git HEAD and uncommitted changes (ml_log)
      events.out.tfevents.*, wandb/   TensorBoard's and W&B's own files (named by those libraries)
      checkpoints.jsonl               CHECKPOINTS_FILE: the checkpoint index, a record appended once the
                                      checkpoint is written (checkpoint_utils.py); read to resume, by the later
                                      stages (their starting points), `rlhfkit sample`, `rlhfkit export`
      checkpoints/NAME/state/         CHECKPOINTS_DIR, STATE_DIR, SAMPLER_DIR: checkpoint NAME (a step as
      checkpoints/NAME/sampler/       %06d, or FINAL_CHECKPOINT) with its optimizer state and its sampler
                                      weights; what is inside them is the engine's (rlhfkit/engine)
      rm/: pm_eval.json               PM_EVAL_FILE: the final judge on held-out comparisons (rlhf_pipeline)
           pm_scaling.json            PM_SCALING_FILE: the data-scaling curve (pm_scaling.py)
      rl/: timeline.jsonl             TIMELINE_FILE: when each part of RL ran (rl/timeline.py); read by the report
           timeline.png               TIMELINE_PLOT: its picture (rl/timeline.py)
           init_sampler/              INIT_SAMPLER_DIR: the starting weights, for kl/policy_vs_init (rl/train.py)
           iteration_NNNNNN/          iteration_dir_name(i) (ITERATION_DIR_PREFIX + %06d): an iteration's
                                      rollouts (rl/rollout_logging.py):
             train.html               TRAIN_HTML_FILE, linked from the report, and
             train_rollout_summaries.jsonl  ROLLOUT_SUMMARIES_FILE
      dpo/: reference_sampler/        REFERENCE_SAMPLER_DIR: the frozen reference policy (preference/train_dpo.py)

Names not here are not a run folder's: a model folder's config.json (Hugging Face), an adapter's files inside a
checkpoint (the engine), the Tinker server's storage (serve/storage.py) and `rlhfkit eval --out`'s files.
"""

from __future__ import annotations

# The run folder
LOCK_FILE = ".rlhfkit.lock"  # in the run folder and in each stage's folder
PIPELINE_CONFIG_FILE = "pipeline_config.json"
ENVIRONMENT_FILE = "environment.json"  # in the run folder and in each stage's folder
STAGE_TIMES_FILE = "stage_times.json"
TINY_MODEL_DIR = "tiny_model"
SEEDS_FILE = "seeds.json"
COMPARISON_FILE = "comparison.json"
REPORT_REPLIES_FILE = "report_replies.json"
REPORT_MD_FILE = "report.md"
REPORT_HTML_FILE = "report.html"
REPORT_DIR = "report"
PM_SCALING_FIGURE = "pm_scaling.png"
RL_TIMELINE_FIGURE = "rl_timeline.png"

# The stages' folders
SFT_DIR = "sft"
RM_DIR = "rm"
RL_DIR = "rl"
DPO_DIR = "dpo"

# A stage's log folder
STAGE_CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
METRICS_PLOT = "metrics.png"
LOG_FILE = "logs.log"
CODE_DIFF_FILE = "code.diff"
CHECKPOINTS_FILE = "checkpoints.jsonl"
CHECKPOINTS_DIR = "checkpoints"
STATE_DIR = "state"
SAMPLER_DIR = "sampler"
FINAL_CHECKPOINT = "final"
PM_EVAL_FILE = "pm_eval.json"  # rm/
PM_SCALING_FILE = "pm_scaling.json"  # rm/
TIMELINE_FILE = "timeline.jsonl"  # rl/
TIMELINE_PLOT = "timeline.png"  # rl/
INIT_SAMPLER_DIR = "init_sampler"  # rl/
ITERATION_DIR_PREFIX = "iteration_"  # rl/
TRAIN_HTML_FILE = "train.html"  # rl/iteration_NNNNNN/
ROLLOUT_SUMMARIES_FILE = "train_rollout_summaries.jsonl"  # rl/iteration_NNNNNN/
REFERENCE_SAMPLER_DIR = "reference_sampler"  # dpo/


def kept_pipeline_config_file(n: int) -> str:
    """pipeline_config.N.json: the N-th earlier record of a run's settings."""
    return f"pipeline_config.{n}.json"


def rl_seed_dir(k: int) -> str:
    """The folder of RL run k over seeds (seed + k): rl, rl_seed1, rl_seed2, ..."""
    return RL_DIR if k == 0 else f"{RL_DIR}_seed{k}"


def iteration_dir_name(iteration: int) -> str:
    """An RL iteration's rollout folder: iteration_000012."""
    return f"{ITERATION_DIR_PREFIX}{iteration:06d}"


def stage_figure(stage: str) -> str:
    """A stage's curves in the report folder: sft.png, rm.png, rl.png, dpo.png."""
    return f"{stage}.png"
