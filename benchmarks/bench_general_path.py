"""The sampling client's general path (any causal LM: equal-length decode batches in the model's own cache,
right-padded scoring) against its fast paths (attention-only models: left padding, preallocated decode cache,
prefix keys/values copied between rows) on the embedded SmolLM2-135M, where both apply: sampling tokens/s at
batch 8 (different LIMA prompts, 128 new tokens) and preference-model scoring comparisons/s (HH-RLHF judging
prompts, shared prefixes on). RLHFKIT_FAST_PATHS=0 forces the general path.

    python benchmarks/bench_general_path.py           # the real model (run it alone)
    python benchmarks/bench_general_path.py --tiny    # a small random model, a quick check

Writes benchmarks/results/general-path[-tiny].json and .md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import common
from bench_engine import NEW_TOKENS, judge_prompts, measure_sampling, measure_scoring
from common import fmt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small random model (quick check)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per workload (default 3)")
    parser.add_argument("--batch", type=int, default=8, help="sampling batch size")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--judge-batch", type=int, default=32, help="comparisons per scoring call")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per judging prompt at most")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common.warn_if_busy()
    info = common.machine_info(args.threads)
    from rlhfkit.engine import ServiceClient

    model = common.workload_model(args.tiny)
    prompts = common.lima_prompts(model, args.batch)
    judge, candidates = judge_prompts(model, args.judge_batch, args.max_length)
    sampler = ServiceClient().create_sampling_client(base_model=model)
    results = {}
    for path, flag in (("fast", "1"), ("general", "0")):
        os.environ["RLHFKIT_FAST_PATHS"] = flag
        sampling = measure_sampling(sampler, prompts, args.batch, args.reps, args.new_tokens)
        scoring = measure_scoring(sampler, judge, candidates, args.reps)
        results[path] = {"sampling": sampling, "scoring": scoring}
        print(
            f"[{path}] sampling batch {args.batch}: {fmt(sampling.median)} tokens/s; scoring: "
            f"{fmt(scoring.median, 2)} comparisons/s",
            flush=True,
        )
    load_at_end = common.load_snapshot()
    rows = [
        [
            s.name,
            s.unit,
            fmt(results["fast"][k].median, 2),
            fmt(results["general"][k].median, 2),
            f"{results['general'][k].median / results['fast'][k].median:.2f}x",
        ]
        for k, s in results["fast"].items()
    ]
    markdown = "\n\n".join(
        [
            f"# General path vs fast paths: {Path(model).name}",
            f"- date: {info['date']}; command: `{info['command']}`; machine: {info['cpu']}, {info['cores']} cores, "
            f"torch threads {info['torch_threads']}; load average at start {info['load_at_start']['loadavg_1m']:.2f}, "
            f"at end {load_at_end['loadavg_1m']:.2f} (above {common.BUSY_LOAD}: shared, figures unreliable)",
            f"Sampling: batch {args.batch} different LIMA prompts, {args.new_tokens} new tokens (no early stop); "
            f"scoring: {args.judge_batch} HH-RLHF judging prompts per call. Medians of {args.reps} repetitions after "
            f"a warm-up, engine default dtype.",
            common.markdown_table(["workload", "unit", "fast paths", "general path", "general / fast"], rows),
        ]
    )
    payload = {
        "machine": info,
        "load_at_end": load_at_end,
        "model": model,
        "settings": vars(args),
        "results": {p: {k: s.as_dict() for k, s in r.items()} for p, r in results.items()},
    }
    common.write_results("general-path-tiny" if args.tiny else "general-path", payload, markdown)


if __name__ == "__main__":
    main()
