"""How a pipeline run's policy replies to its held-out win-rate prompts: empty replies, lengths, examples.

    .venv/bin/python examples/reply_check.py runs/demo            # the RLHF policy (rl/)
    .venv/bin/python examples/reply_check.py runs/demo --stage sft

Samples `--samples` replies to each of the run's win-rate prompts (its `win_rate_prompts` held-out HH-RLHF
prompts, at most `rl_max_tokens` tokens, as in RL) at `--temperature`, and prints how many are empty, the
median length in tokens, and the first few. The README's empty-reply counts come from this script with its
defaults. Uses the run's own settings (its pipeline_config.json) and the library API only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path

from rlhfkit import renderers
from rlhfkit.engine import ServiceClient, types
from rlhfkit.recipes.preference.rlhf.pipeline_config import parse_args
from rlhfkit.recipes.preference.rlhf.pipeline_data import held_out_comparisons
from rlhfkit.sampling_cli import resolve_model


async def sample_all(sampler, renderer, prompts, samples: int, params) -> list[list[int]]:
    responses = await asyncio.gather(
        *(sampler.sample_async(renderer.build_generation_prompt(prompt), samples, params) for prompt in prompts)
    )
    return [seq.tokens for response in responses for seq in response.sequences]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log_root", help="a pipeline run's log_root (holds pipeline_config.json, sft/, rl/)")
    parser.add_argument("--stage", default="rl", choices=["sft", "rl"])
    parser.add_argument("--samples", type=int, default=4, help="replies per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--show", type=int, default=8, help="replies to print")
    args = parser.parse_args()

    root = Path(args.log_root)
    cfg = parse_args([f"config={root / 'pipeline_config.json'}"])
    checkpoint, base_model, renderer_name = resolve_model(str(root / args.stage))
    sampler = ServiceClient().create_sampling_client(model_path=checkpoint, base_model=base_model)
    renderer = renderers.get_renderer(renderer_name or cfg.renderer_name or "chat_template", sampler.get_tokenizer())
    prompts = [c.comparison.prompt_conversation for c in held_out_comparisons(cfg, "rl", cfg.win_rate_prompts)]
    params = types.SamplingParams(
        max_tokens=cfg.rl_max_tokens, temperature=args.temperature, stop=renderer.get_stop_sequences(), seed=args.seed
    )

    tokens = asyncio.run(sample_all(sampler, renderer, prompts, args.samples, params))
    texts = [renderers.get_text_content(renderer.parse_response(t)[0]) for t in tokens]
    empty = sum(not text.strip() for text in texts)
    print(
        f"{root / args.stage}: {len(texts)} replies ({len(prompts)} prompts x {args.samples}) at temperature "
        f"{args.temperature}: {empty} empty; median length {statistics.median(len(t) for t in tokens)} tokens"
    )
    for text in texts[: args.show]:
        print(f"  {text[:100]!r}")


if __name__ == "__main__":
    main()
