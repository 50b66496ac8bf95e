"""In-process A/B of the engine's two CPU speed-ups, switched on and off step by step in ONE process, so both
variants see the same machine load (finer-grained than ab_engine.py's alternating processes):

  * `--change lora`: LoRA training steps (forward_backward cross_entropy + optim_step on one batch of LIMA
    conversations) with lora.fused_lora_forward against PEFT's own LoRA forward;
  * `--change head`: preference-model scoring (score_next_token_batch on HH-RLHF judging prompts), or with
    `--head-workload sampling` generation (`--sample-batch` LIMA prompts, `--new-tokens` each), with and
    without sampling.contiguous_input on the unembedding.

    python benchmarks/ab_inprocess.py --change lora --dtype bfloat16 --rounds 6
    python benchmarks/ab_inprocess.py --change head --dtype float32 --tiny --rounds 2   # a quick check

Prints each round and the medians; writes benchmarks/results/<--out or ab-<change>-<dtype>>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import common
from common import fmt


def lora_steps(args: argparse.Namespace, model: str):
    """(switch(on), step() -> tokens/s) for LoRA training."""
    from rlhfkit.engine.model.lora import LoraSpec, fused_lora_forward
    from rlhfkit.engine.model.base import pick_precision
    from rlhfkit.engine.torch_engine.trainer import LoraTrainer
    from rlhfkit.engine.types import AdamParams

    batch = common.sft_batches(model, args.train_batch, args.max_length, 1)[0]
    trainer = LoraTrainer(LoraSpec(model, rank=args.lora_rank, seed=0), pick_precision(dtype=args.dtype))
    layers = [m for m in trainer.model.modules() if "forward" in m.__dict__]
    tokens = sum(common.datum_tokens(d) for d in batch)

    def switch(on: bool) -> None:
        for layer in layers:
            if on:
                layer.forward = types.MethodType(fused_lora_forward, layer)
            elif "forward" in layer.__dict__:
                del layer.forward

    def step() -> float:
        start = time.perf_counter()
        trainer.forward_backward(batch, "cross_entropy", None, True)
        trainer.optim_step(AdamParams(learning_rate=1e-5))
        return tokens / (time.perf_counter() - start)

    return switch, step, "tokens/s"


def head_steps(args: argparse.Namespace, model: str):
    """(switch(on), step() -> comparisons/s or tokens/s) for next-token scoring or sampling."""
    from bench_engine import judge_prompts, measure_sampling
    from rlhfkit.engine import ServiceClient
    from rlhfkit.engine.torch_engine.sampler import contiguous_input

    sampler = ServiceClient(dtype=args.dtype).create_sampling_client(base_model=model)
    head = sampler.model.get_output_embeddings()
    prompts, candidates = judge_prompts(model, args.judge_batch, args.max_length)

    def switch(on: bool) -> None:
        head._forward_pre_hooks.clear()
        if on:
            head.register_forward_pre_hook(contiguous_input)

    def step() -> float:
        start = time.perf_counter()
        sampler.score_next_token_batch(prompts, candidates)
        return len(prompts) / (time.perf_counter() - start)

    if args.head_workload == "sampling":
        lima = common.lima_prompts(model, args.sample_batch)
        return switch, lambda: measure_sampling(sampler, lima, len(lima), 1, args.new_tokens).median, "tokens/s"
    return switch, step, "comparisons/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--change", choices=("lora", "head"), required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of one step each way (order alternates)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--judge-batch", type=int, default=16)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--head-workload", choices=("scoring", "sampling"), default="scoring")
    parser.add_argument("--sample-batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tiny", action="store_true", help="a small random model (quick check)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    info = common.machine_info(args.threads)
    model = common.workload_model(args.tiny)
    switch, step, unit = (lora_steps if args.change == "lora" else head_steps)(args, model)
    for on in (True, False):  # warm-up
        switch(on)
        step()
    values: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for on in (True, False) if round_ % 2 == 0 else (False, True):
            switch(on)
            values[on].append(step())
        print(f"round {round_ + 1}: off {values[False][-1]:.1f}, on {values[True][-1]:.1f} {unit}", flush=True)
    off, on = statistics.median(values[False]), statistics.median(values[True])
    ratios = [b / a for a, b in zip(values[False], values[True])]
    load_at_end = common.load_snapshot()
    markdown = "\n\n".join(
        [
            f"# In-process A/B: {args.change} ({args.head_workload if args.change == 'head' else 'training'}), {args.dtype}, {Path(model).name}",
            common.machine_lines_without_limit(info, load_at_end, [args.dtype]),
            common.markdown_table(
                ["change", "unit", "off (median)", "on (median)", "on / off", "on / off per round"],
                [
                    [
                        args.change,
                        unit,
                        fmt(off, 2),
                        fmt(on, 2),
                        f"{on / off:.2f}x",
                        ", ".join(f"{r:.2f}" for r in ratios),
                    ]
                ],
            ),
        ]
    )
    payload = {
        "machine": info,
        "load_at_end": load_at_end,
        "settings": vars(args),
        "on": values[True],
        "off": values[False],
    }
    workload = f"-{args.head_workload}" if args.change == "head" else ""
    common.write_results(args.out or f"ab-{args.change}{workload}-{args.dtype}", payload, markdown)


if __name__ == "__main__":
    main()
