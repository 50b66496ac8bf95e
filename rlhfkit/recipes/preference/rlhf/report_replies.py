"""The pipeline step that samples the replies the report shows: the base model's, the SFT policy's and the RLHF
policy's reply to the tutorial's prompt and to the first `report_prompts` held-out win-rate prompts, written to
log_root/report_replies.json with the sampling settings (the report only reads that file)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from rlhfkit import checkpoint_utils
from rlhfkit.recipes.preference.rlhf.pipeline_config import PipelineConfig
from rlhfkit.recipes.preference.rlhf.pipeline_data import held_out_comparisons
from rlhfkit.run_files import REPORT_REPLIES_FILE, RL_DIR, SFT_DIR
from rlhfkit.utils.atomic import write_json_atomic

TUTORIAL_PROMPT = "What is the most important thing to consider when learning a new programming language?"
EMPTY_REPLY = "(empty reply: the model stopped at once)"
TEMPERATURE = 0.7
MAX_TOKENS = 200


def report_prompts(cfg: PipelineConfig) -> list[list[dict]]:
    """The tutorial's prompt, then the first `report_prompts` held-out win-rate prompts of the run's HH data."""
    held_out = held_out_comparisons(cfg, "rl", cfg.report_prompts) if cfg.report_prompts > 0 else []
    return [[{"role": "user", "content": TUTORIAL_PROMPT}]] + [c.comparison.prompt_conversation for c in held_out]


async def sample_report_replies(cfg: PipelineConfig, base_model: str, renderer_name: str) -> Path:
    """Sample (temperature 0.7, up to 200 tokens, seeded) and write report_replies.json: {"base_model",
    "renderer_name", "sampling": {"temperature", "max_tokens", "seed"}, "policies": {name: checkpoint},
    "replies": [{"prompt", "base", "sft", "rlhf"}, ...]}. Kept if it exists with the same prompts, policies and
    sampling settings."""
    from rlhfkit.engine import ServiceClient, types
    from rlhfkit.renderers import get_renderer, get_text_content

    out_path = Path(cfg.log_root) / REPORT_REPLIES_FILE
    prompts = report_prompts(cfg)
    last = {
        name: checkpoint_utils.get_last_checkpoint(f"{cfg.log_root}/{stage}", required_key="sampler_path")
        for name, stage in (("sft", SFT_DIR), ("rlhf", RL_DIR))
    }
    checkpoints = {name: os.path.relpath(record.sampler_path, cfg.log_root) for name, record in last.items()}
    header = {
        "base_model": base_model,
        "renderer_name": renderer_name,
        "sampling": {"temperature": TEMPERATURE, "max_tokens": MAX_TOKENS, "seed": cfg.seed},
        "policies": {"base": None, **checkpoints},
    }
    if out_path.exists():
        earlier = json.loads(out_path.read_text())
        if {k: earlier.get(k) for k in header} == header and [i["prompt"] for i in earlier["replies"]] == prompts:
            return out_path
    service = ServiceClient(settings=cfg.engine_settings())
    samplers = {
        name: service.create_sampling_client(
            model_path=None if path is None else f"{cfg.log_root}/{path}", base_model=base_model
        )
        for name, path in header["policies"].items()
    }
    renderer = get_renderer(renderer_name, samplers["base"].get_tokenizer())
    params = types.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=TEMPERATURE, stop=renderer.get_stop_sequences(), seed=cfg.seed
    )
    replies: list[dict[str, Any]] = [{"prompt": p} for p in prompts]
    for name, sampler in samplers.items():
        responses = await asyncio.gather(
            *(sampler.sample_async(renderer.build_generation_prompt(p), 1, params) for p in prompts)
        )
        for item, response in zip(replies, responses, strict=True):
            text = get_text_content(renderer.parse_response(response.sequences[0].tokens)[0])
            item[name] = text if text.strip() else EMPTY_REPLY
    write_json_atomic(out_path, {**header, "replies": replies})
    return out_path
