"""A/B of two rlhfkit source trees (two worktrees or exported commits) on the engine's workloads, in one run:
each round runs one short measurement per tree in a fresh process, alternating A, B, A, B, ..., so both
trees see the same machine load; the report gives each tree's median and the ratio B / A per workload.

    python benchmarks/ab_engine.py --a /path/to/main --b /path/to/branch --dtype bfloat16 --rounds 4
    python benchmarks/ab_engine.py --a ... --b ... --tiny --rounds 1     # a quick check of the script
    python benchmarks/ab_engine.py --a . --b . --b-env RLHFKIT_MICROBATCH_TOKENS=2048   # one tree, two settings

The measurement itself (bench_engine.py's training, scoring and sampling loops) comes from this script's own
folder for both trees; only the `rlhfkit` package differs. Writes benchmarks/results/<--out>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import fmt

WORKLOADS = ("training", "scoring", "sampling")


def worker(args: argparse.Namespace) -> None:
    """One measurement of each workload with the rlhfkit on PYTHONPATH; prints one JSON line of medians."""
    import logging

    import torch

    from bench_engine import judge_prompts, measure_sampling, measure_scoring, measure_training
    from rlhfkit.engine import ServiceClient

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    model = common.workload_model(args.tiny)
    service = ServiceClient(dtype=args.dtype)
    workloads = args.workloads.split(",")
    out = {}
    if "sampling" in workloads or "scoring" in workloads:
        sampler = service.create_sampling_client(base_model=model)
        if "sampling" in workloads:
            prompts = common.lima_prompts(model, args.sample_batch)
            out["sampling"] = measure_sampling(sampler, prompts, args.sample_batch, args.reps, args.new_tokens).median
        if "scoring" in workloads:
            judge, candidates = judge_prompts(model, args.judge_batch, args.max_length)
            out["scoring"] = measure_scoring(sampler, judge, candidates, args.reps).median
        del sampler
    if "training" in workloads:
        batches = common.sft_batches(model, args.train_batch, args.max_length, args.reps + 1)
        trainer = service.create_lora_training_client(model, rank=args.lora_rank, seed=0)
        out["training"] = measure_training(trainer, batches, 2e-4).median
    print("RESULT " + json.dumps(out), flush=True)


def run_tree(tree: str, argv: list[str], extra_env: dict[str, str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "HF_HUB_OFFLINE": "1", **extra_env}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", *argv], env=env, capture_output=True, text=True, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"the worker for {tree} failed:\n{proc.stderr[-3000:]}")


def parse_env(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE arguments as a dict (an error names the malformed one)."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The measurement settings, as arguments for a worker process."""
    argv = []
    for key in (
        "dtype",
        "workloads",
        "reps",
        "train_batch",
        "max_length",
        "judge_batch",
        "sample_batch",
        "new_tokens",
        "lora_rank",
        "threads",
    ):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return argv + (["--tiny"] if args.tiny else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", help="source tree A (the baseline: a folder holding the rlhfkit package)")
    parser.add_argument("--b", help="source tree B (the change)")
    parser.add_argument("--a-env", nargs="*", default=[], metavar="KEY=VALUE", help="environment of A's processes")
    parser.add_argument("--b-env", nargs="*", default=[], metavar="KEY=VALUE", help="environment of B's processes")
    parser.add_argument("--rounds", type=int, default=4, help="A/B rounds (each runs A then B, or B then A)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (bfloat16 or float32)")
    parser.add_argument("--workloads", default="training,scoring", help=f"comma-separated, of {WORKLOADS}")
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions per workload per process")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--judge-batch", type=int, default=16)
    parser.add_argument("--sample-batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tiny", action="store_true", help="a small random model (quick check)")
    parser.add_argument("--out", default="engine-ab", help="results file stem")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not (args.a and args.b):
        parser.error("--a and --b are required")
    envs = {"A": parse_env(parser, args.a_env), "B": parse_env(parser, args.b_env)}
    passed = worker_argv(args)
    info = common.machine_info(args.threads)
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for round_ in range(args.rounds):
        order = ["A", "B"] if round_ % 2 == 0 else ["B", "A"]
        for name in order:
            results[name].append(run_tree(args.a if name == "A" else args.b, passed, envs[name]))
            print(f"round {round_ + 1} {name}: {results[name][-1]}", flush=True)
    load_at_end = common.load_snapshot()
    rows = []
    for workload in args.workloads.split(","):
        a = statistics.median(r[workload] for r in results["A"])
        b = statistics.median(r[workload] for r in results["B"])
        per_round = [rb[workload] / ra[workload] for ra, rb in zip(results["A"], results["B"])]
        rows.append([workload, fmt(a, 2), fmt(b, 2), f"{b / a:.2f}x", ", ".join(f"{x:.2f}" for x in per_round)])
    markdown = "\n\n".join(
        [
            f"# A/B: {args.dtype}, {Path(common.workload_model(args.tiny)).name}",
            common.machine_lines_without_limit(info, load_at_end, [args.dtype]),
            f"- A = `{args.a}` {' '.join(args.a_env)}, B = `{args.b}` {' '.join(args.b_env)}; {args.rounds} rounds alternating A and B, one process each "
            f"({args.reps} timed repetitions after a warm-up; training tokens/s, scoring comparisons/s, sampling "
            f"tokens/s at batch {args.sample_batch}).",
            common.markdown_table(["workload", "A (median)", "B (median)", "B / A", "B / A per round"], rows),
        ]
    )
    payload = {"machine": info, "load_at_end": load_at_end, "settings": vars(args), "results": results}
    common.write_results(args.out, payload, markdown)


if __name__ == "__main__":
    main()
