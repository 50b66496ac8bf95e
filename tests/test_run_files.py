"""rlhfkit/run_files.py names every file and folder of a run folder: it imports nothing but the standard library,
its docstring describes each name, and a real run (the smoke preset with every optional stage and file: method=both,
two RL seeds, the data-scaling curve) writes exactly the files it names, under those names."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit import run_files as rf

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RLHFKIT_DTYPE": "float32", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
NAMES = {k: v for k, v in vars(rf).items() if k.isupper() and isinstance(v, str)}
HELPERS = ("kept_pipeline_config_file", "rl_seed_dir", "iteration_dir_name", "stage_figure")


def test_run_files_imports_only_the_standard_library():
    code = (
        "import sys; before = set(sys.modules); import rlhfkit.run_files; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before} - {'rlhfkit'}; "
        "assert not new - set(sys.stdlib_module_names), sorted(new - set(sys.stdlib_module_names))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_docstring_describes_every_name():
    for name in [*NAMES, *HELPERS]:
        assert name in rf.__doc__, name
    assert rf.rl_seed_dir(0) == rf.RL_DIR and rf.rl_seed_dir(2) == "rl_seed2"
    assert (
        rf.iteration_dir_name(7) == "iteration_000007" and rf.kept_pipeline_config_file(3) == "pipeline_config.3.json"
    )


# Folders whose contents are another component's: a checkpoint's (the engine), the tiny model's (Hugging Face files).
OPAQUE = {rf.STATE_DIR, rf.SAMPLER_DIR, rf.INIT_SAMPLER_DIR, rf.REFERENCE_SAMPLER_DIR, rf.TINY_MODEL_DIR}


def stage_entry_named(stage: str, parts: tuple[str, ...]) -> bool:
    """Whether a path inside a stage's folder is one run_files names (TensorBoard's event files are the library's)."""
    first = parts[0]
    if len(parts) == 1:
        own = {rf.LOCK_FILE, rf.STAGE_CONFIG_FILE, rf.ENVIRONMENT_FILE, rf.METRICS_FILE, rf.METRICS_PLOT, rf.LOG_FILE}
        own |= {rf.CODE_DIFF_FILE, rf.CHECKPOINTS_FILE, rf.CHECKPOINTS_DIR}
        own |= {rf.RM_DIR: {rf.PM_EVAL_FILE, rf.PM_SCALING_FILE}, rf.DPO_DIR: {rf.REFERENCE_SAMPLER_DIR}}.get(
            stage, set()
        )
        if stage.startswith(rf.RL_DIR):
            own |= {rf.TIMELINE_FILE, rf.TIMELINE_PLOT, rf.INIT_SAMPLER_DIR}
        return first in own or first.startswith("events.out.tfevents.") or is_iteration_dir(stage, first)
    if first == rf.CHECKPOINTS_DIR:  # checkpoints/NAME/{state,sampler}
        return len(parts) == 2 or (len(parts) == 3 and parts[2] in (rf.STATE_DIR, rf.SAMPLER_DIR))
    if is_iteration_dir(stage, first):
        return len(parts) == 2 and parts[1] in (rf.TRAIN_HTML_FILE, rf.ROLLOUT_SUMMARIES_FILE)
    return False


def is_iteration_dir(stage: str, name: str) -> bool:
    index = name.removeprefix(rf.ITERATION_DIR_PREFIX)
    return stage.startswith(rf.RL_DIR) and index.isdigit() and rf.iteration_dir_name(int(index)) == name


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    args = ["preset=smoke", f"log_root={root}", "method=both", "seeds=2", "pm_scaling_points=2"]
    result = subprocess.run(
        [sys.executable, "-m", "rlhfkit", "pipeline", *args],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root


@pytest.mark.slow  # a fourth full smoke run (about a minute): the default run has the three of test_pipeline.py
def test_a_run_writes_the_files_run_files_names(full_run):
    root = full_run
    stages = (rf.SFT_DIR, rf.RM_DIR, rf.RL_DIR, rf.rl_seed_dir(1), rf.DPO_DIR)
    top = {
        rf.LOCK_FILE, rf.PIPELINE_CONFIG_FILE, rf.ENVIRONMENT_FILE, rf.STAGE_TIMES_FILE, rf.TINY_MODEL_DIR,
        rf.SEEDS_FILE, rf.COMPARISON_FILE, rf.REPORT_REPLIES_FILE, rf.REPORT_MD_FILE, rf.REPORT_HTML_FILE,
        rf.REPORT_DIR, *stages,
    }  # fmt: skip
    figures = {rf.stage_figure(s) for s in ("sft", "rm", "rl", "dpo")} | {rf.PM_SCALING_FIGURE, rf.RL_TIMELINE_FIGURE}
    unnamed = []
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if set(parts[:-1]) & OPAQUE:
            continue
        if len(parts) == 1:
            named = parts[0] in top
        elif parts[0] == rf.REPORT_DIR:
            named = len(parts) == 2 and parts[1] in figures
        elif parts[0] in stages:
            named = stage_entry_named(parts[0], parts[1:])
        else:
            named = False
        if not named:
            unnamed.append("/".join(parts))
    assert not unnamed, unnamed
    # and the names are there: every top-level name, every figure, each stage's own files
    assert {p.name for p in root.iterdir()} == top
    assert {p.name for p in (root / rf.REPORT_DIR).iterdir()} == figures
    for stage in stages:
        for name in (rf.STAGE_CONFIG_FILE, rf.ENVIRONMENT_FILE, rf.METRICS_FILE, rf.LOG_FILE, rf.CHECKPOINTS_FILE):
            assert (root / stage / name).is_file(), (stage, name)
        final = root / stage / rf.CHECKPOINTS_DIR / rf.FINAL_CHECKPOINT
        assert (final / rf.STATE_DIR).is_dir() and (final / rf.SAMPLER_DIR).is_dir(), stage
    for name in (rf.PM_EVAL_FILE, rf.PM_SCALING_FILE):
        assert (root / rf.RM_DIR / name).is_file(), name
    for stage in (rf.RL_DIR, rf.rl_seed_dir(1)):
        assert (root / stage / rf.TIMELINE_FILE).is_file() and (root / stage / rf.INIT_SAMPLER_DIR).is_dir()
        first = root / stage / rf.iteration_dir_name(0)
        assert (first / rf.TRAIN_HTML_FILE).is_file() and (first / rf.ROLLOUT_SUMMARIES_FILE).is_file()
    assert (root / rf.DPO_DIR / rf.REFERENCE_SAMPLER_DIR).is_dir()
