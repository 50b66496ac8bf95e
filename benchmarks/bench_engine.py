"""Engine throughput on the embedded SmolLM2-135M: sampling tokens/s at batch 1, 8 and 32 (128 new tokens),
LoRA training tokens/s (SFT steps on LIMA) and preference-model scoring comparisons/s, in bf16 and fp32,
with each workload's fraction of the machine's matmul limit (see common.py for the FLOP formulas).

    python benchmarks/bench_engine.py            # the real model, ~5 minutes on 2 cores (run it alone)
    python benchmarks/bench_engine.py --tiny     # a small random model, a quick check

Writes benchmarks/results/engine[-tiny].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import common
from common import Series, fmt

NEW_TOKENS = 128


def measure_sampling(sampler, prompts: list[list[int]], batch: int, reps: int, new_tokens: int) -> Series:
    """Tokens/s generating `new_tokens` tokens (stop=[]: no early stop) for `batch` different prompts at once."""
    from rlhfkit.engine import ModelInput, SamplingParams

    async def run(seed: int, max_tokens: int):
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[], seed=seed)
        return await asyncio.gather(
            *(sampler.sample_async(ModelInput.from_ints(p), 1, params) for p in prompts[:batch])
        )

    asyncio.run(run(0, 4))  # warm-up
    values = []
    for rep in range(reps):
        seconds, responses = common.timed(lambda: asyncio.run(run(rep, new_tokens)))
        tokens = sum(len(s.tokens) for r in responses for s in r.sequences)
        values.append(tokens / seconds)
    return Series(f"sampling batch {batch}", "tokens/s", values)


def measure_training(trainer, batches: list[list], learning_rate: float) -> Series:
    """Tokens/s of LoRA SFT steps (forward_backward with cross_entropy + optim_step); batch 0 is a warm-up."""
    from rlhfkit.engine import AdamParams

    values = []
    for i, batch in enumerate(batches):

        def step():
            trainer.forward_backward(batch, "cross_entropy").result()
            trainer.optim_step(AdamParams(learning_rate=learning_rate)).result()

        seconds, _ = common.timed(step)
        if i > 0:
            values.append(sum(common.datum_tokens(d) for d in batch) / seconds)
    return Series("LoRA training", "tokens/s", values)


def measure_scoring(sampler, prompts: list, candidates: list[int], reps: int) -> Series:
    """Comparisons/s judging `prompts` (one batched score_next_token_batch call)."""
    sampler.score_next_token_batch(prompts[:2], candidates)  # warm-up
    values = []
    for _ in range(reps):
        seconds, _ = common.timed(lambda: sampler.score_next_token_batch(prompts, candidates))
        values.append(len(prompts) / seconds)
    return Series("preference-model scoring", "comparisons/s", values)


def judge_prompts(base_model: str, count: int, max_length: int):
    """Rendered PM judging prompts (HH-RLHF comparisons) and the label tokens A and B."""
    from rlhfkit.preference.types import ComparisonRendererFromChatRenderer
    from rlhfkit.recipes.preference.datasets import HHHComparisonBuilder

    renderer = ComparisonRendererFromChatRenderer(common.renderer_for(base_model))
    builder = HHHComparisonBuilder(role="preference_model")
    rows, _ = builder.get_train_and_test_datasets()
    prompts = []
    for row in rows:
        labeled = builder.example_to_labeled_comparison(row)
        if labeled is None:
            continue
        prompt = renderer.build_generation_prompt(labeled.comparison)
        if prompt.length <= max_length:
            prompts.append(prompt)
        if len(prompts) == count:
            break
    return prompts, [renderer.label_token("A"), renderer.label_token("B")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small random model (quick check)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per workload (default 3)")
    parser.add_argument(
        "--dtypes",
        default=None,
        help="compute dtypes, comma-separated (default: the engine's choice, plus float32 when that is bfloat16)",
    )
    parser.add_argument("--batches", default="1,8,32", help="sampling batch sizes")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--train-batch", type=int, default=8, help="sequences per training step")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per training sequence at most")
    parser.add_argument("--judge-batch", type=int, default=32, help="comparisons per scoring call")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--workloads", default="sampling,training,scoring")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=None, help="results file stem (default engine[-tiny])")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common.warn_if_busy()
    info = common.machine_info(args.threads)
    from rlhfkit.engine import ServiceClient

    model = common.workload_model(args.tiny)
    workloads = set(args.workloads.split(","))
    batch_sizes = [int(b) for b in args.batches.split(",")]
    print(f"model {model}; load average {info['load_at_start']['loadavg_1m']:.2f}", flush=True)
    dtypes = common.benchmark_dtypes(args.dtypes)
    limits = common.matmul_limits(dtypes, args.tiny)
    print("matmul limit: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in limits.items()), flush=True)
    prompts = common.lima_prompts(model, max(batch_sizes))
    train_batches = common.sft_batches(model, args.train_batch, args.max_length, args.reps + 1)
    judge, candidates = judge_prompts(model, args.judge_batch, args.max_length)

    results: dict[str, dict[str, Series]] = {}
    n_params = n_head = 0
    for dtype in dtypes:
        service = ServiceClient(dtype=dtype)
        series: dict[str, Series] = {}
        sampler = service.create_sampling_client(base_model=model)
        n_params = common.matmul_params(sampler.model)
        n_head = common.unembedding_params(sampler.model)
        if "sampling" in workloads:
            for b in batch_sizes:
                series[f"sampling_b{b}"] = s = measure_sampling(sampler, prompts, b, args.reps, args.new_tokens)
                print(f"[{dtype}] {s.name}: {fmt(s.median)} {s.unit}  {[round(v, 1) for v in s.values]}", flush=True)
        if "scoring" in workloads:
            series["scoring"] = s = measure_scoring(sampler, judge, candidates, args.reps)
            print(f"[{dtype}] {s.name}: {fmt(s.median, 2)} {s.unit}", flush=True)
        del sampler
        if "training" in workloads:
            trainer = service.create_lora_training_client(model, rank=args.lora_rank, seed=0)
            series["training"] = s = measure_training(trainer, train_batches, 2e-4)
            print(f"[{dtype}] {s.name}: {fmt(s.median)} {s.unit}  {[round(v, 1) for v in s.values]}", flush=True)
            del trainer
        gc.collect()
        results[dtype] = series

    judge_tokens = sum(p.length for p in judge) / len(judge)
    flops_per_unit = {
        "training": 4 * n_params,
        "scoring": 2 * (n_params - n_head) * judge_tokens + 2 * n_head,
        **{f"sampling_b{b}": 2 * n_params for b in batch_sizes},
    }
    load_at_end = common.load_snapshot()
    dtypes = list(results)
    limits = common.remeasure_limits(limits, dtypes, args.tiny)
    payload = {
        "machine": info,
        "load_at_end": load_at_end,
        "model": model,
        "matmul_params": n_params,
        "matmul_limit_flops": limits,
        "flops_per_unit": flops_per_unit,
        "settings": dict(vars(args).items()),
        "results": {d: {k: s.as_dict() for k, s in series.items()} for d, series in results.items()},
    }
    header = ["workload", "unit", *dtypes]
    if len(dtypes) == 2:
        header.append(f"{dtypes[0]} / {dtypes[1]}")
    header += [f"MFU ({d})" for d in dtypes]
    rows = []
    for key, s in results[dtypes[0]].items():
        row = [s.name, s.unit] + [fmt(results[d][key].median, 2 if key == "scoring" else 1) for d in dtypes]
        if len(dtypes) == 2:
            row.append(f"{results[dtypes[0]][key].median / results[dtypes[1]][key].median:.2f}x")
        for d in dtypes:
            limit = limits[d]
            row.append(f"{100 * results[d][key].median * flops_per_unit[key] / limit:.1f}%")
        rows.append(row)
    markdown = "\n\n".join(
        [
            f"# Engine throughput: {Path(model).name}",
            common.machine_markdown(info, load_at_end, limits, dtypes),
            f"Sampling: {args.new_tokens} new tokens per sequence (no early stop), temperature 1, different LIMA "
            f"prompts per row. Training: LoRA rank {args.lora_rank}, {args.train_batch} LIMA conversations per step "
            f"(<= {args.max_length} tokens each), cross_entropy + Adam; tokens/s counts real (unpadded) tokens. "
            f"Scoring: {args.judge_batch} HH-RLHF judging prompts per call (mean {judge_tokens:.0f} tokens). "
            f"Medians of {args.reps} repetitions after a warm-up. MFU = achieved FLOP/s over the matmul limit of "
            f"the dtype, with 2N FLOPs per sampled token, 4N per trained token and 2(N-H) per scored token + 2H "
            f"per comparison, N = {n_params / 1e6:.1f}M matmul parameters, H = {n_head / 1e6:.1f}M of them in the "
            f"unembedding.",
            common.markdown_table(header, rows),
        ]
    )
    stem = args.out or ("engine-tiny" if args.tiny else "engine")
    common.write_results(stem, payload, markdown)


if __name__ == "__main__":
    main()
