"""Tiny randomly initialised models with a real tokenizer, for tests and quick smoke runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlhfkit.paths import shared_data_dir

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def build_tiny_model(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                     architecture: str = "qwen2") -> Path:
    """Write a tiny random model with the real Qwen tokenizer to `out_dir`: the Qwen2 architecture, or with
    architecture="llama" the Llama one (same sizes and tied embeddings; vLLM can put a LoRA adapter on a Llama
    unembedding, not on a Qwen2 one). Like any base model it has no chat template (so its recommended renderer
    is role_colon)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if architecture not in ("qwen2", "llama"):
        raise ValueError(f"build_tiny_model: architecture={architecture!r}, expected 'qwen2' or 'llama'")

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    src = shared_data_dir() / "tokenizers" / "qwen2"
    config = json.loads((src / "config.json").read_text())
    config.update(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_window_layers=num_layers,
                  max_position_embeddings=4096, torch_dtype="float32")
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    torch.manual_seed(seed)
    if architecture == "llama":
        config = {key: value for key, value in config.items() if key not in ("model_type", "architectures")}
        config_class = LlamaConfig
    else:
        config_class = Qwen2Config
    model = AutoModelForCausalLM.from_config(config_class(**config))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out_dir / name)
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out_dir
