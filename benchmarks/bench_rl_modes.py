"""The demo's RL stage in its three execution modes, in one run: synchronous (the tutorial's loop), asynchronous
(rl_max_steps_off_policy=1) and streaming (rl_stream_minibatches=2), spec 5.8.

The SFT policy and the preference model are made once (preset=demo with --sft-steps and --rm-steps steps, a
reduced judge on this shared CPU); each mode then runs RL from them for --rl-steps iterations in its own log
folder (one process each, one after another), with the demo's RL settings otherwise (4 groups of 4 replies
of at most 48 tokens, lr 2e-4, KL penalty 0.2) and the win rate on --win-rate-prompts held-out prompts before
the first update and after --eval-every updates. Reported per mode: the RL stage's wall time per iteration
(from its timeline: first span to the end of the last training step, divided by the iterations), the median
time/total of an iteration, the win rates, the reply length, and the timeline picture
(results/rl-modes-<mode>-timeline.png). Results: benchmarks/results/bench-rl-modes.{json,md}.

    python benchmarks/bench_rl_modes.py [--rl-steps 3] [--eval-every 2] [--tiny]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, fmt, load_snapshot, machine_info, machine_lines_without_limit, write_results

from rlhfkit.paths import cache_dir
from rlhfkit.utils.atomic import read_jsonl

REPO = Path(__file__).resolve().parent.parent
PIPELINE = [sys.executable, "-m", "rlhfkit", "pipeline"]  # the module alone has no __main__: it ran nothing
MODES = {
    "synchronous": [],
    "asynchronous": ["rl_max_steps_off_policy=1"],
    "streaming": ["rl_stream_minibatches=2"],
}


def pipeline(args: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(PIPELINE + args, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rl-steps", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--win-rate-prompts", type=int, default=16)
    parser.add_argument("--sft-steps", type=int, default=4)
    parser.add_argument("--rm-steps", type=int, default=16)
    parser.add_argument("--root", default=None, help="work folder (default: the cache's bench/rl-modes)")
    parser.add_argument("--tiny", action="store_true", help="preset=smoke's tiny model (checks the script)")
    args = parser.parse_args()

    import torch

    info = machine_info(torch.get_num_threads())
    root = Path(args.root) if args.root else cache_dir() / "bench" / ("rl-modes-tiny" if args.tiny else "rl-modes")
    preset = "preset=smoke" if args.tiny else "preset=demo"
    stages = root / "stages"
    common = [preset, f"win_rate_prompts={args.win_rate_prompts}", "report=false", "pm_eval_size=40"]
    stage_seconds = pipeline(
        [
            *common,
            f"log_root={stages}",
            "run_rl=false",
            f"sft_max_steps={args.sft_steps}",
            f"rm_max_steps={args.rm_steps}",
        ]
    )
    results = {}
    for mode, extra in MODES.items():
        folder = root / mode
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for stage in ("sft", "rm"):
            (folder / stage).symlink_to(stages / stage)
        seconds = pipeline(
            [
                *common,
                f"log_root={folder}",
                "run_sft=false",
                "run_rm=false",
                f"rl_max_steps={args.rl_steps}",
                f"rl_eval_every={args.eval_every}",
                *extra,
            ]
        )
        records = read_jsonl(folder / "rl" / "metrics.jsonl")
        spans = read_jsonl(folder / "rl" / "timeline.jsonl")
        trains = [s for s in spans if s["kind"] == "train" and s["step"] >= 0]
        rl_wall = max(s["end"] for s in trains) - min(s["start"] for s in spans)
        evals = [r for r in records if "test/win_rate" in r]
        picture = RESULTS_DIR / f"rl-modes-{mode}{'-tiny' if args.tiny else ''}-timeline.png"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "rl" / "timeline.png", picture)
        results[mode] = {
            "process_seconds": seconds,
            "rl_wall_seconds": rl_wall,
            "seconds_per_iteration": rl_wall / len(records),
            "median_time_total": statistics.median(r["time/total"] for r in records),
            "win_rate": [(r["step"], r["test/win_rate"], r["test/stderr"]) for r in evals],
            "ac_tokens_per_turn": [r["env/all/ac_tokens_per_turn"] for r in records],
            "staleness_max": [r.get("sampling_client/staleness_max", 0.0) for r in records],
            "timeline": picture.name,
        }
    load_at_end = load_snapshot()
    rows = []
    for mode, r in results.items():
        win = " → ".join(f"{100 * w:.1f}% ± {100 * e:.1f} (step {s})" for s, w, e in r["win_rate"])
        rows.append(
            f"| {mode} | {fmt(r['seconds_per_iteration'])} | {fmt(r['median_time_total'])} | {win} | "
            f"{' → '.join(fmt(x) for x in r['ac_tokens_per_turn'])} | {r['staleness_max']} | "
            f"![{mode}]({r['timeline']}) |"
        )
    markdown = "\n".join(
        [
            "# The demo's RL stage: synchronous vs asynchronous (max_steps_off_policy=1) vs streaming (2 minibatches)",
            "",
            f"{preset}'s RL settings from one SFT policy ({args.sft_steps} steps) and one preference model "
            f"({args.rm_steps} steps; a reduced judge), {args.rl_steps} RL iterations per mode, win rate on "
            f"{args.win_rate_prompts} held-out prompts at steps 0 and {args.eval_every}; the modes one after "
            f"another in one run of this script (SFT + preference model: {fmt(stage_seconds)} s).",
            "",
            "| mode | wall s per iteration (timeline) | median time/total | test/win_rate | reply tokens per "
            "iteration | staleness max per iteration | timeline |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Wall s per iteration: from the RL stage's first span to the end of its last training step, over the "
            "iterations (evaluations included: the synchronous loop waits for them, the others overlap them).",
            "",
            machine_lines_without_limit(info, load_at_end, []),
        ]
    )
    write_results(
        "bench-rl-modes" + ("-tiny" if args.tiny else ""),
        {"info": info, "load_at_end": load_at_end, "settings": vars(args), "stage_seconds": stage_seconds, **results},
        markdown,
    )


if __name__ == "__main__":
    main()
