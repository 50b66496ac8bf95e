"""The preference model's held-out sets, the evaluation of one of its checkpoints on them, and the data-scaling
curve: held-out accuracy (in and out of distribution) against the number of training comparisons, from the
checkpoints saved along the stage (rm/pm_scaling.json, shown by the report).

The curve's points come from one run: an early point's weights were trained while the learning rate had not yet
decayed, so a point shows what the judge knows after N comparisons of this run's schedule, not what a run sized
for N comparisons would reach. Its last point is the final checkpoint, whose figures are rm/pm_eval.json's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhfkit import checkpoint_utils
from rlhfkit.checkpoint_utils import CheckpointRecord
from rlhfkit.preference.types import LabeledComparison
from rlhfkit.recipes.preference.rlhf.pipeline_config import PipelineConfig
from rlhfkit.recipes.preference.rlhf.pipeline_data import (
    held_out_comparisons,
    held_out_ood_comparisons,
    out_of_distribution_splits,
)
from rlhfkit.run_files import FINAL_CHECKPOINT, METRICS_FILE, PM_SCALING_FILE, RM_DIR
from rlhfkit.utils.atomic import read_jsonl, write_json_atomic


def held_out_sets(cfg: PipelineConfig) -> dict[str, tuple[str, list[LabeledComparison]]]:
    """prefix -> (title, comparisons): `pm`: up to pm_eval_size PM-test comparisons of the run's own data (in
    distribution); `ood`: up to pm_eval_size PM-test comparisons of the offline HH-RLHF splits the data leaves out
    (only when the data names some of the offline splits)."""
    sets = {"pm": ("in distribution", held_out_comparisons(cfg, "preference_model", cfg.pm_eval_size))}
    ood_splits = out_of_distribution_splits(cfg)
    if ood_splits:
        sets["ood"] = (
            f"out of distribution: {', '.join(ood_splits)}",
            held_out_ood_comparisons(cfg, cfg.pm_eval_size),
        )
    return sets


async def evaluate_checkpoint(
    sampler_path: str,
    renderer_name: str,
    base_model: str,
    sets: dict[str, tuple[str, list[LabeledComparison]]],
    verbose: bool = True,
    engine: Any = None,
) -> dict[str, float]:
    """The preference model at `sampler_path` on each held-out set, every comparison judged in both orders
    (pm_eval.PMEvalResult's metrics under the set's prefix); printed when verbose."""
    from rlhfkit.engine import ServiceClient
    from rlhfkit.preference.pm_eval import evaluate_preference_model, format_pm_eval
    from rlhfkit.preference.types import PreferenceModelFromChatRenderer
    from rlhfkit.renderers import get_renderer
    from rlhfkit.tokenizer_utils import get_tokenizer

    sampler = ServiceClient(settings=engine).create_sampling_client(model_path=sampler_path)
    pm = PreferenceModelFromChatRenderer(get_renderer(renderer_name, get_tokenizer(base_model)), sampler)
    metrics: dict[str, float] = {}
    for prefix, (title, comparisons) in sets.items():
        result = await evaluate_preference_model(pm, comparisons)
        if verbose:
            print(f"[rlhfkit] {title}\n{format_pm_eval(result)}")
        metrics.update(result.metrics(prefix))
    return metrics


def training_steps(record: CheckpointRecord, metrics: list[dict]) -> int:
    """Training steps done when the checkpoint was saved: its name for a step checkpoint ("000020" is saved before
    step 20 runs), every logged step for the final one."""
    if record.name == FINAL_CHECKPOINT:
        return 1 + max((r["step"] for r in metrics if "train_mean_nll" in r), default=-1)
    return int(record.name)


def training_comparisons(steps: int, metrics: list[dict], both_orders: bool) -> int:
    """Comparisons trained on in the first `steps` steps (from each step's num_sequences; a comparison trained in
    both orders counts once)."""
    sequences = sum(int(r["num_sequences"]) for r in metrics if "num_sequences" in r and r["step"] < steps)
    return sequences // 2 if both_orders else sequences


def scaling_checkpoints(records: list[CheckpointRecord], points: int) -> list[CheckpointRecord]:
    """`points` of the checkpoints with sampler weights, evenly spaced in saving order and ending with the last
    (the final one); all of them when fewer were saved."""
    usable = [r for r in records if r.has("sampler_path")]
    if len(usable) <= points:
        return usable
    if points == 1:
        return usable[-1:]
    picks = sorted({round(k * (len(usable) - 1) / (points - 1)) for k in range(points)})
    return [usable[k] for k in picks]


async def evaluate_pm_scaling(
    cfg: PipelineConfig, base_model: str, renderer_name: str, final_metrics: dict[str, Any]
) -> list[dict[str, Any]]:
    """The data-scaling curve on pm_scaling_points of the preference model's checkpoints (scaling_checkpoints), each
    evaluated on the held-out sets of rm/pm_eval.json (the final one's figures are `final_metrics`, pm_eval.json's).
    Written to rm/pm_scaling.json after every point; a point already there is not evaluated again (a killed run
    resumes). Each point: checkpoint name, steps, comparisons, and the pm/... and ood/... metrics."""
    rm_dir = Path(cfg.log_root) / RM_DIR
    out = rm_dir / PM_SCALING_FILE
    done = {p["checkpoint"]: p for p in (json.loads(out.read_text())["points"] if out.exists() else [])}
    metrics = read_jsonl(rm_dir / METRICS_FILE)
    chosen = scaling_checkpoints(checkpoint_utils.load_checkpoints_file(rm_dir), cfg.pm_scaling_points)
    sets = None
    points = []
    for record in chosen:
        if record.name not in done:
            if record.name == FINAL_CHECKPOINT:
                figures = {k: v for k, v in final_metrics.items() if isinstance(v, (int, float))}
            else:
                sets = sets if sets is not None else held_out_sets(cfg)
                print(f"[rlhfkit] data-scaling curve: the preference model at checkpoint {record.name}")
                figures = await evaluate_checkpoint(
                    record.sampler_path, renderer_name, base_model, sets, verbose=False, engine=cfg.engine_settings()
                )
            steps = training_steps(record, metrics)
            done[record.name] = {
                "checkpoint": record.name,
                "steps": steps,
                "comparisons": training_comparisons(steps, metrics, cfg.rm_both_orders),
                **figures,
            }
        points.append(done[record.name])
        write_json_atomic(out, {"points": points})
    return points
