"""A/B of the RL iteration's judging phase (issue 25, "one judging contract"), in one process.

The demo's RL iteration judges rl_batch_size=4 groups of rl_group_size=4 replies (48 tokens at most): 12
matchups per group, 48 judgements. Before: `PreferenceModelFromChatRenderer.judge_many` called the blocking
`score_next_token_batch`, so `asyncio.gather` over the groups judged them one after another, one scoring call
per group. After: one `score_next_token_async` per comparison, so the sampling client's RequestBatcher serves
every group's matchups in one scoring call. Both variants judge the same replies (sampled once from the base
model on the demo's RL prompts) with the same judge (the base model; a trained judge's LoRA is merged into its
weights, so it costs the same), alternating A and B; medians of `--reps`. The number of scoring calls
(`_score_many`) per iteration is recorded too.

    python benchmarks/bench_rl_judging.py [--reps 5] [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    fmt,
    load_snapshot,
    machine_info,
    machine_lines_without_limit,
    renderer_name,
    rl_prompts,
    workload_model,
    write_results,
)

from rlhfkit.engine import ServiceClient
from rlhfkit.engine.types import SamplingParams
from rlhfkit.preference.types import Judgement, PreferenceModelFromChatRenderer
from rlhfkit.renderers import get_renderer
from rlhfkit.rl.preference_envs import PairwisePreferenceGroupBuilder, PreferenceEnv, TournamentPattern
from rlhfkit.rl.rollouts import score_group
from rlhfkit.rl.types import Trajectory, Transition
from rlhfkit.completers import TokensWithLogprobs
from rlhfkit.tokenizer_utils import get_tokenizer


class BlockingJudge(PreferenceModelFromChatRenderer):
    """The judge before the change: judge_many blocks the event loop on one batched call per caller."""

    async def judge_many(self, comparisons) -> list[Judgement]:
        if not comparisons:
            return []
        prompts = [self.comparison_renderer.build_generation_prompt(c) for c in comparisons]
        return [self._judgement(s) for s in self.sampling_client.score_next_token_batch(prompts, self.label_tokens)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()

    import torch

    info = machine_info(torch.get_num_threads())
    model = workload_model(args.tiny)
    renderer = get_renderer(renderer_name(model), get_tokenizer(model))
    service = ServiceClient()
    policy = service.create_sampling_client(base_model=model)
    judge_client = service.create_sampling_client(base_model=model)
    calls: list[int] = []
    score_many = judge_client._score_many
    judge_client._score_many = lambda prompts, cands: calls.append(len(prompts)) or score_many(prompts, cands)

    prompts = rl_prompts(args.groups)
    sampled = []
    for k, prompt in enumerate(prompts):  # the replies, once
        ob = renderer.build_generation_prompt(prompt)
        params = SamplingParams(max_tokens=args.max_tokens, stop=renderer.get_stop_sequences(), seed=k)
        seqs = policy.sample(ob, args.group_size, params).result().sequences
        sampled.append(
            [
                Trajectory([Transition(ob, TokensWithLogprobs(s.tokens, s.logprobs, s.stop_reason), 0.0, True)], ob)
                for s in seqs
            ]
        )

    judges = {
        "before": BlockingJudge(renderer, judge_client),
        "after": PreferenceModelFromChatRenderer(renderer, judge_client),
    }

    async def judge_iteration(judge) -> list:
        builders = [
            PairwisePreferenceGroupBuilder(p, renderer, TournamentPattern.ALL_PAIRS_BOTH_WAYS, judge, args.group_size)
            for p in prompts
        ]
        envs = [[PreferenceEnv(p, renderer)] * args.group_size for p in prompts]
        return await asyncio.gather(*(score_group(b, e, t) for b, e, t in zip(builders, envs, sampled)))

    seconds: dict[str, list[float]] = {"before": [], "after": []}
    calls_per_iteration: dict[str, list[int]] = {}
    rewards: dict[str, list] = {}
    for name, judge in judges.items():  # warm-up, and the scoring calls of one iteration
        calls.clear()
        rewards[name] = [g.final_rewards_G for g in asyncio.run(judge_iteration(judge))]
        calls_per_iteration[name] = list(calls)
    for _ in range(args.reps):
        for name, judge in judges.items():
            start = time.perf_counter()
            asyncio.run(judge_iteration(judge))
            seconds[name].append(time.perf_counter() - start)
    load_at_end = load_snapshot()
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    same = rewards["before"] == rewards["after"]
    from rlhfkit.engine.model.base import pick_precision

    dtype = str(pick_precision().compute_dtype).removeprefix("torch.")
    table = (
        "| variant | scoring calls per iteration (prompts each) | judging s per iteration (median) | runs (s) |\n"
        "|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {len(calls_per_iteration[name])} ({', '.join(map(str, calls_per_iteration[name]))}) | "
            f"{fmt(medians[name], 2)} | {', '.join(fmt(s, 2) for s in seconds[name])} |"
            for name in seconds
        )
    )
    markdown = "\n".join(
        [
            "# The RL iteration's judging phase: one scoring call per group (before) vs one per iteration (after)",
            "",
            f"Model {model} (policy and judge), {args.groups} groups x {args.group_size} replies of at most "
            f"{args.max_tokens} tokens, all-pairs tournament ({args.group_size * (args.group_size - 1)} matchups "
            f"per group), engine dtype {dtype}; {args.reps} alternating repetitions after a warm-up.",
            "",
            table,
            "",
            f"After / before: {medians['after'] / medians['before']:.2f}. Same verdicts both ways: {same}.",
            "",
            machine_lines_without_limit(info, load_at_end, []),
        ]
    )
    write_results(
        "bench-rl-judging" + ("-tiny" if args.tiny else ""),
        {
            "info": info,
            "load_at_end": load_at_end,
            "seconds": seconds,
            "medians": medians,
            "scoring_calls": calls_per_iteration,
            "same_verdicts": same,
            "settings": vars(args),
        },
        markdown,
    )


if __name__ == "__main__":
    main()
