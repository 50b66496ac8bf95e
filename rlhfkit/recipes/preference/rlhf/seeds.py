"""RL over several seeds: the run folders of each seed and the win-rate gain over seeds, with its 95% t-interval.

Every seed's RL run starts from the same SFT policy and is judged by the same preference model; only the RL seed
(rollout sampling, the engine's fallback seeds) differs. The win-rate evaluation uses the same prompts and sampling
seed in every run, so the first test/win_rate (on the SFT weights) is the same and the gains are paired.
"""

from __future__ import annotations

import math
from pathlib import Path

from rlhfkit.run_files import METRICS_FILE, SEEDS_FILE, rl_seed_dir
from rlhfkit.utils.atomic import read_jsonl, write_json_atomic
from rlhfkit.utils.stats import t_interval

WIN_RATE = "test/win_rate"


def rl_runs(seed: int, seeds: int) -> list[tuple[str, int]]:
    """(stage folder, RL seed) of each run: ("rl", seed), then ("rl_seed1", seed + 1), ... ("rl" stays the
    pipeline's RL stage, so resume, the report and the comparisons keep reading it)."""
    return [(rl_seed_dir(k), seed + k) for k in range(seeds)]


def win_rate_gain(metrics_path: Path) -> dict[str, float]:
    """The first and last test/win_rate of an RL run's metrics.jsonl, their steps and the gain (last - first)."""
    values = [
        (r["step"], r[WIN_RATE])
        for r in read_jsonl(metrics_path)
        if isinstance(r.get(WIN_RATE), (int, float)) and math.isfinite(r[WIN_RATE])
    ]
    if len(values) < 2:
        raise ValueError(
            f"{metrics_path}: {len(values)} {WIN_RATE} evaluation(s); a gain needs two (make "
            f"rl_max_steps larger than rl_eval_every)"
        )
    (first_step, first), (last_step, last) = values[0], values[-1]
    return {"first_step": first_step, "first": first, "last_step": last_step, "last": last, "gain": last - first}


def summarize_seeds(log_root: str | Path, runs: list[tuple[str, int]], confidence: float = 0.95) -> dict:
    """Each run's win-rate gain and their mean with a t-interval over runs; written to log_root/seeds.json."""
    root = Path(log_root)
    rows = [{"folder": folder, "seed": seed, **win_rate_gain(root / folder / METRICS_FILE)} for folder, seed in runs]
    mean, low, high = t_interval([row["gain"] for row in rows], confidence)
    summary = {
        "metric": WIN_RATE,
        "n": len(rows),
        "confidence": confidence,
        "mean_gain": mean,
        "ci_low": low,
        "ci_high": high,
        "runs": rows,
    }
    write_json_atomic(root / SEEDS_FILE, summary)
    return summary


def format_seeds(summary: dict) -> str:
    gains = ", ".join(f"{row['folder']} {100 * row['gain']:+.1f}" for row in summary["runs"])
    return (
        f"win-rate gain over {summary['n']} seeds: {100 * summary['mean_gain']:+.1f} points, "
        f"{100 * summary['confidence']:.0f}% CI [{100 * summary['ci_low']:+.1f}, {100 * summary['ci_high']:+.1f}]"
        f" ({gains})"
    )
