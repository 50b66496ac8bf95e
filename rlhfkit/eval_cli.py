"""`rlhfkit eval`: a preference model's accuracy on comparison data, and a policy's win rate judged by one.

  rlhfkit eval pm --model RM [--data DATA] [--n N] [--out DIR]
      accuracy in both A/B orders with 95% CIs, position bias (share of "A" verdicts), order agreement
  rlhfkit eval winrate --judge RM --policy MODEL [--opponent MODEL|reference] [--prompts DATA] [--n N] [--out DIR]
      the policy's win rate (mean of (r0 - r1 + 2)/4 over prompts, both orders judged) with its standard error

Models: an rlhfkit checkpoint directory, a stage log directory (its last checkpoint), a PEFT adapter folder, or a
base model name. DATA: a JSONL file of labelled comparisons ({"prompt_conversation", "completion_A",
"completion_B", "label"}; its first N rows), or HH-RLHF data as the pipeline's `hh_data` takes it (offline split
names, files, "Anthropic/hh-rlhf"; default: the four offline splits), of which the first N held-out rows are used
(the PM test rows for `pm`, the win-rate rows for `winrate`) — so the same settings as a pipeline run reproduce its
rm/pm_eval.json and test/win_rate. `--prompts` also takes a prompts file (one per line, or JSONL with a "prompt"
field) when the opponent is a model. With --out, DIR/<pm_eval|winrate>.{json,html} are written.
"""

from __future__ import annotations

import argparse
import asyncio
import html
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: sans-serif; max-width: 70em; margin: 1em auto; }
pre { white-space: pre-wrap; background: #f5f5f5; padding: .4em; margin: .2em 0; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: .2em .5em; }
.item { border-top: 2px solid #444; margin-top: 2em; } .bad { color: #b00; } .good { color: #070; }
"""


def load_model(model: str, renderer_name: str | None) -> tuple[Any, str, str]:
    """(sampling client, base model, renderer name) for a checkpoint, log directory, PEFT folder or base model."""
    from rlhfkit import model_info
    from rlhfkit.engine import EngineSettings, ServiceClient
    from rlhfkit.sampling_cli import resolve_model

    checkpoint, base, recorded = resolve_model(model)
    service = ServiceClient(settings=EngineSettings.from_env())  # the command line's engine: RLHFKIT_*
    sampler = (
        service.create_sampling_client(model_path=checkpoint, base_model=base)
        if checkpoint
        else service.create_sampling_client(base_model=base)
    )
    return sampler, base, renderer_name or recorded or model_info.get_recommended_renderer_name(base)


def _conversation(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def write_outputs(out: str | None, name: str, title: str, summary: str, result: dict, items_html: list[str]) -> None:
    from rlhfkit.utils.atomic import write_json_atomic, write_text_atomic

    print(summary)
    if out is None:
        return
    folder = Path(out)
    write_json_atomic(folder / f"{name}.json", result)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{_pre(summary)}"
        + "".join(items_html)
        + "</body></html>"
    )
    write_text_atomic(folder / f"{name}.html", page)
    print(f"written: {folder / f'{name}.json'}  and  {folder / f'{name}.html'}")


# --------------------------------------------------------------------------------------------------
# rlhfkit eval pm


async def eval_pm(args: argparse.Namespace) -> dict:
    from rlhfkit.preference.pm_eval import format_pm_eval, judge_both_orders, summarize_judgements
    from rlhfkit.preference.types import PreferenceModelFromChatRenderer
    from rlhfkit.recipes.preference.datasets import read_eval_comparisons
    from rlhfkit.renderers import get_renderer

    sampler, _, renderer_name = load_model(args.model, args.renderer)
    comparisons = read_eval_comparisons(args.data, "preference_model", args.n, args.max_chars)
    pm = PreferenceModelFromChatRenderer(get_renderer(renderer_name, sampler.get_tokenizer()), sampler)
    original, flipped = await judge_both_orders(pm, comparisons)
    summary = summarize_judgements(comparisons, original, flipped)
    rows = [
        {
            "label": c.label,
            "verdict_original": a.verdict,
            "verdict_swapped": b.verdict,
            "p_b_original": a.p_b,
            "p_b_swapped": b.p_b,
        }
        for c, a, b in zip(comparisons, original, flipped)
    ]
    items = []
    for k, (c, row) in enumerate(zip(comparisons, rows)):
        right = [
            row["verdict_original"] == {"A": -1.0, "B": 1.0}.get(c.label, 0.0),
            row["verdict_swapped"] == {"A": 1.0, "B": -1.0}.get(c.label, 0.0),
        ]
        marks = " ".join(
            f"<span class='{'good' if ok else 'bad'}'>{order}: {'right' if ok else 'wrong'}</span>"
            for order, ok in zip(("as given", "swapped"), right)
        )
        items.append(
            f"<div class='item'><h3>Comparison {k} (label {c.label}) — {marks}</h3>"
            f"<b>Prompt</b>{_pre(_conversation(c.comparison.prompt_conversation))}"
            f"<b>A</b>{_pre(_conversation(c.comparison.completion_A))}"
            f"<b>B</b>{_pre(_conversation(c.comparison.completion_B))}"
            f"<p>P(B) as given {row['p_b_original']:.3f}, swapped {row['p_b_swapped']:.3f}</p></div>"
        )
    result = {"model": args.model, "data": args.data, "metrics": summary.metrics(), "comparisons": rows}
    write_outputs(args.out, "pm_eval", f"Preference model {args.model}", format_pm_eval(summary), result, items)
    return result


# --------------------------------------------------------------------------------------------------
# rlhfkit eval winrate


def _prompt_conversations(data: str | None, n: int, max_chars: int | None) -> list[list[dict]]:
    """Prompts only (the opponent is a model): a prompts file, or the prompts of comparison data."""
    from rlhfkit.recipes.preference.datasets import read_eval_comparisons
    from rlhfkit.sampling_cli import read_prompts

    if data is not None and Path(data).is_file() and not data.endswith(".gz"):
        first = next((line for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()), "")
        if not first.lstrip().startswith("{") or '"prompt"' in first:
            return [[{"role": "user", "content": p}] for p in read_prompts(data)[:n]]
    return [c.comparison.prompt_conversation for c in read_eval_comparisons(data, "rl", n, max_chars)]


async def eval_winrate(args: argparse.Namespace) -> dict:
    from rlhfkit.completers import TinkerMessageCompleter
    from rlhfkit.preference.comparison_policy_evaluator import ComparisonEvaluator
    from rlhfkit.preference.types import Comparison, PreferenceModelBuilderFromChatRenderer
    from rlhfkit.recipes.preference.datasets import read_eval_comparisons
    from rlhfkit.renderers import get_renderer
    from rlhfkit.sampling_cli import resolve_model

    policy, policy_base, renderer_name = load_model(args.policy, args.renderer)
    judge_checkpoint, judge_base, judge_renderer = resolve_model(args.judge)
    if judge_checkpoint is None:
        raise SystemExit(f"--judge {args.judge}: expected a preference-model checkpoint, log directory or adapter")
    judge = PreferenceModelBuilderFromChatRenderer(
        renderer_name=args.judge_renderer or judge_renderer or renderer_name,
        model_name=judge_base,
        rm_weights_path=judge_checkpoint,
        reward_mode=args.reward_mode,
    )
    if args.opponent == "reference":
        labeled = read_eval_comparisons(args.prompts, "rl", args.n, args.max_chars)
        comparisons = [(c.swap() if c.label == "B" else c).comparison for c in labeled]  # A = the preferred reply
    else:
        opponent, _, _ = load_model(args.opponent, renderer_name)
        prompts = _prompt_conversations(args.prompts, args.n, args.max_chars)
        completer = TinkerMessageCompleter(
            opponent,
            get_renderer(renderer_name, opponent.get_tokenizer()),
            args.max_tokens,
            temperature=1.0,
            seed=args.seed + len(prompts),
        )
        replies = await asyncio.gather(*(completer(p) for p in prompts))
        comparisons = [Comparison(p, [r], []) for p, r in zip(prompts, replies)]
    evaluator = ComparisonEvaluator(
        judge, comparisons, renderer_name, policy_base, max_tokens=args.max_tokens, seed=args.seed
    )
    matchups = await evaluator.matchups(policy)
    metrics = matchups.metrics()
    rows = [
        {
            "prompt": c.prompt_conversation,
            "opponent": c.completion_A,
            "policy": r,
            "verdict_policy_as_b": v0,
            "verdict_policy_as_a": v1,
            "score": float(s),
        }
        for c, r, v0, v1, s in zip(
            matchups.comparisons,
            matchups.replies,
            matchups.verdicts_policy_as_b,
            matchups.verdicts_policy_as_a,
            matchups.scores,
        )
    ]
    items = [
        f"<div class='item'><h3>Prompt {k}: score {row['score']:.2f} "
        f"<span class='{'good' if row['score'] > 0.5 else 'bad' if row['score'] < 0.5 else ''}'>"
        f"({'policy wins' if row['score'] > 0.5 else 'opponent wins' if row['score'] < 0.5 else 'tie'})</span>"
        f"</h3>{_pre(_conversation(row['prompt']))}<b>Policy</b>{_pre(row['policy']['content'])}"
        f"<b>Opponent ({html.escape(args.opponent)})</b>{_pre(_conversation(row['opponent']))}"
        f"<p>verdict with the policy as B {row['verdict_policy_as_b']:+.0f}, as A "
        f"{row['verdict_policy_as_a']:+.0f} (-1 = A preferred, +1 = B preferred)</p></div>"
        for k, row in enumerate(rows)
    ]
    summary = (
        f"win rate of {args.policy} against {args.opponent} on {len(rows)} prompts, judged by {args.judge}:\n"
        f"  {100 * metrics['win_rate']:.1f}% ± {100 * metrics['stderr']:.1f}% (stderr)"
    )
    result = {
        "policy": args.policy,
        "opponent": args.opponent,
        "judge": args.judge,
        "prompts": args.prompts,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "metrics": metrics,
        "matchups": rows,
    }
    write_outputs(args.out, "winrate", f"Win rate of {args.policy} vs {args.opponent}", summary, result, items)
    return result


def check_data_argument(flag: str, spec: str | None) -> None:
    """A data argument names existing files, offline HH-RLHF split names or Hub dataset names (UsageError)."""
    from rlhfkit.cli_errors import fail
    from rlhfkit.data_sources import parse_sources
    from rlhfkit.recipes.preference.rlhf.pipeline_config import offline_hh_splits

    if spec is None:
        return
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if Path(item).expanduser().is_file():
            continue
        try:
            parse_sources(item, offline_hh_splits())
        except (ValueError, FileNotFoundError) as e:
            fail(f"{flag} {spec!r}: {e}")


def check_arguments(args: argparse.Namespace) -> None:
    """Every model and data argument, before any model or data loads (one line naming the argument)."""
    from rlhfkit.sampling_cli import check_model_argument

    if args.command == "pm":
        check_data_argument("--data", args.data)
        check_model_argument("--model", args.model)
    else:
        check_data_argument("--prompts", args.prompts)
        for flag, model in (("--judge", args.judge), ("--policy", args.policy), ("--opponent", args.opponent)):
            if not (flag == "--opponent" and model == "reference"):
                check_model_argument(flag, model)


def eval_main(argv: list[str]) -> int:
    from rlhfkit.cli_errors import ArgumentParser, positive_int

    parser = ArgumentParser(
        prog="rlhfkit eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    pm = commands.add_parser("pm", help="a preference model's accuracy on comparison data")
    pm.add_argument("--model", required=True, help="the preference model (checkpoint, log dir, PEFT folder)")
    pm.add_argument("--data", default=None, help="comparison JSONL file, or HH-RLHF splits/files (default: offline)")
    pm.add_argument("--n", type=positive_int, default=1024, help="comparisons to judge (the pipeline's pm_test_size)")
    win = commands.add_parser("winrate", help="a policy's win rate judged by a preference model")
    win.add_argument("--judge", required=True, help="the preference model (checkpoint, log dir, PEFT folder)")
    win.add_argument("--policy", required=True, help="the policy (checkpoint, log dir, PEFT folder, base model)")
    win.add_argument(
        "--opponent", default="reference", help="'reference' (the data's preferred replies) or another model"
    )
    win.add_argument("--prompts", default=None, help="comparison data (as --data of `pm`) or a prompts file")
    win.add_argument("--n", type=positive_int, default=256, help="prompts (the pipeline's win_rate_prompts)")
    win.add_argument(
        "--max-tokens", type=positive_int, default=1024, help="reply length (the pipeline's rl_max_tokens)"
    )
    win.add_argument("--seed", type=int, default=0, help="prompt k's reply is sampled with seed + k (the run's seed)")
    win.add_argument("--reward-mode", default="verdict", choices=["verdict", "probability", "symmetric"])
    win.add_argument(
        "--judge-renderer", default=None, help="the judge's renderer (default: the one it was trained with)"
    )
    for sub in (pm, win):
        sub.add_argument("--max-chars", type=positive_int, default=None, help="HH-RLHF: the run's hh_max_chars")
        sub.add_argument("--renderer", default=None, help="renderer (default: the one recorded, else recommended)")
        sub.add_argument("--out", default=None, help="folder for the JSON and HTML results")
    args = parser.parse_args(argv)
    check_arguments(args)
    asyncio.run(eval_pm(args) if args.command == "pm" else eval_winrate(args))
    return 0
