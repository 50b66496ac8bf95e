"""`rlhfkit sample`: replies from a base model, a checkpoint directory, or a stage's log directory."""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit.engine import ServiceClient, types
from rlhfkit.engine.lora import META_FILE
from rlhfkit.errors import CheckpointError


def resolve_model(model: str, base_model: str | None = None) -> tuple[str | None, str, str | None]:
    """(checkpoint path or None, base model, renderer recorded by the run or None)."""
    from rlhfkit import checkpoint_utils

    path = Path(model).expanduser()
    renderer = None
    if path.is_dir() and (path / "checkpoints.jsonl").exists():  # a stage's log directory
        record = checkpoint_utils.get_last_checkpoint(str(path), required_key="sampler_path")
        if record is None:
            raise CheckpointError(f"{path}: checkpoints.jsonl lists no intact sampler checkpoint (none saved yet, "
                                  f"or all damaged: see the warnings above)")
        config_file = path / "config.json"
        if config_file.exists():
            renderer = json.loads(config_file.read_text()).get("renderer_name")
        path = Path(record.sampler_path)
    if path.is_dir() and (path / META_FILE).exists():
        meta = json.loads((path / META_FILE).read_text())
        return str(path), base_model or meta["lora"]["base_model"], renderer
    return None, base_model or model, renderer


def sample_replies(model: str, prompt: str, base_model: str | None = None, renderer_name: str | None = None,
                   max_tokens: int = 200, temperature: float = 0.7, num_samples: int = 1,
                   seed: int | None = None) -> list[str]:
    from rlhfkit import model_info, renderers

    checkpoint, base, recorded_renderer = resolve_model(model, base_model)
    service = ServiceClient()
    sampler = (service.create_sampling_client(model_path=checkpoint, base_model=base) if checkpoint
               else service.create_sampling_client(base_model=base))
    name = renderer_name or recorded_renderer or model_info.get_recommended_renderer_name(base)
    renderer = renderers.get_renderer(name, sampler.get_tokenizer())
    model_input = renderer.build_generation_prompt([{"role": "user", "content": prompt}])
    params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                  stop=renderer.get_stop_sequences(), seed=seed)
    response = sampler.sample(model_input, num_samples, params).result()
    return [renderers.get_text_content(renderer.parse_response(seq.tokens)[0]) for seq in response.sequences]
