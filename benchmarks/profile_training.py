"""Where a LoRA training step spends its time, at 1 and at N threads: torch.profiler's self CPU time per operator
for the same step (forward_backward cross_entropy + optim_step on one batch of LIMA conversations), side by side
with each operator's speed-up from 1 to N threads. Operators that do not speed up with threads are what keeps
the 2-thread MFU below the 1-thread one. Run alone on the machine.

    python benchmarks/profile_training.py --dtype bfloat16 --threads 2
    python benchmarks/profile_training.py --tiny --steps 1     # a quick check of the script

Writes benchmarks/results/<--out or profile-training-<dtype>>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import common
from common import fmt


def profile(trainer, batch, threads: int, steps: int) -> tuple[dict[str, float], float]:
    """(self CPU seconds per operator, wall seconds) over `steps` steps at `threads` threads, after a warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from rlhfkit.engine.types import AdamParams

    torch.set_num_threads(threads)

    def step():
        trainer.forward_backward(batch, "cross_entropy", None, True)
        trainer.optim_step(AdamParams(learning_rate=1e-5))

    step()  # warm-up at this thread count
    per_op: dict[str, float] = defaultdict(float)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    for event in prof.key_averages():
        per_op[event.key] += event.self_cpu_time_total / 1e6
    return dict(per_op), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2, help="the thread count compared with 1")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per thread count")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--top", type=int, default=20, help="operators listed")
    parser.add_argument("--tiny", action="store_true", help="a small random model (quick check)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from rlhfkit.engine.model.lora import LoraSpec
    from rlhfkit.engine.model.base import pick_precision
    from rlhfkit.engine.torch_engine.trainer import LoraTrainer

    common.warn_if_busy()
    model = common.workload_model(args.tiny)
    batch = common.sft_batches(model, args.train_batch, args.max_length, 1)[0]
    tokens = sum(common.datum_tokens(d) for d in batch)
    trainer = LoraTrainer(LoraSpec(model, rank=args.lora_rank, seed=0), pick_precision(dtype=args.dtype))
    info = common.machine_info(args.threads)
    one, wall_one = profile(trainer, batch, 1, args.steps)
    many, wall_many = profile(trainer, batch, args.threads, args.steps)
    load_at_end = common.load_snapshot()

    total_one, total_many = sum(one.values()), sum(many.values())
    rows = []
    for op in sorted(many, key=many.get, reverse=True)[: args.top]:
        speedup = one.get(op, 0.0) / many[op] if many[op] else float("nan")
        rows.append(
            [
                f"`{op}`",
                f"{100 * one.get(op, 0.0) / total_one:.1f}%",
                f"{100 * many[op] / total_many:.1f}%",
                fmt(1000 * one.get(op, 0.0) / args.steps, 1),
                fmt(1000 * many[op] / args.steps, 1),
                f"{speedup:.2f}x",
            ]
        )
    n = args.threads
    markdown = "\n\n".join(
        [
            f"# Profile of a LoRA training step: {Path(model).name}, {args.dtype}, 1 vs {n} threads",
            common.machine_lines_without_limit(info, load_at_end, [args.dtype]),
            f"- One step = forward_backward (cross_entropy) + optim_step on {args.train_batch} LIMA conversations "
            f"(<= {args.max_length} tokens, {tokens} tokens), LoRA rank {args.lora_rank}; {args.steps} profiled "
            f"steps per thread count after a warm-up. Wall time per step: 1 thread {wall_one / args.steps:.2f} s "
            f"({tokens * args.steps / wall_one:.0f} tokens/s), {n} threads {wall_many / args.steps:.2f} s "
            f"({tokens * args.steps / wall_many:.0f} tokens/s): {wall_one / wall_many:.2f}x. Self CPU time is "
            "the profiler's per-operator time on the calling thread (work of the intra-op threads is inside it).",
            common.markdown_table(
                ["operator", "share, 1 thread", f"share, {n} threads", "ms/step, 1", f"ms/step, {n}", "speed-up"],
                rows,
            ),
        ]
    )
    payload = {
        "machine": info,
        "load_at_end": load_at_end,
        "settings": vars(args),
        "wall_seconds": {"1": wall_one, str(n): wall_many},
        "self_cpu_seconds": {"1": one, str(n): many},
    }
    common.write_results(args.out or f"profile-training-{args.dtype}", payload, markdown)


if __name__ == "__main__":
    main()
