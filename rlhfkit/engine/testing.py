"""Tiny randomly initialised models with a real tokenizer, for tests and quick smoke runs.

`build_tiny_architecture(out_dir, name)` writes one of ARCHITECTURES, all with the real Qwen tokenizer (the only
tokenizer stored offline besides SmolLM2's GGUF), 4 heads and a hidden size of 64 by default:

  llama      Llama (untied embeddings)
  qwen2      Qwen2 (tied embeddings; what `build_tiny_model` writes)
  qwen3      Qwen3 (tied, q/k norms)
  qwen3_5    Qwen3.5 text model: Gated DeltaNet linear-attention layers around one full-attention layer (untied)
  gemma2     Gemma 2: final-logit and attention soft-capping, sliding-window layers (window 16, so tests that
             run past 16 tokens exercise it; tied)
  qwen3_moe  Qwen3-MoE: 4 experts, 2 per token (untied)

Like any base model they have no chat template (so their recommended renderer is role_colon).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rlhfkit.paths import shared_data_dir

TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_5", "gemma2", "qwen3_moe")


def _architecture_config(name: str, hidden_size: int, num_layers: int | None) -> tuple[str, dict[str, Any]]:
    """(transformers config class name, its fields) for a tiny model of architecture `name`."""
    heads = 4
    head_dim = hidden_size // heads
    if name == "llama":
        return "LlamaConfig", dict(num_hidden_layers=num_layers or 2, tie_word_embeddings=False)
    if name == "qwen2":
        layers = num_layers or 2
        return "Qwen2Config", dict(num_hidden_layers=layers, max_window_layers=layers, tie_word_embeddings=True)
    if name == "qwen3":
        return "Qwen3Config", dict(num_hidden_layers=num_layers or 2, head_dim=head_dim, tie_word_embeddings=True)
    if name == "qwen3_5":
        # linear attention before and after the full-attention layer (the real models: 3 linear, then 1 full)
        types = ["linear_attention", "full_attention", "linear_attention"]
        if num_layers is not None:
            types = [("full_attention" if i % 4 == 1 else "linear_attention") for i in range(num_layers)]
        return "Qwen3_5TextConfig", dict(
            num_hidden_layers=len(types),
            layer_types=types,
            head_dim=head_dim,
            linear_key_head_dim=head_dim,
            linear_value_head_dim=head_dim,
            linear_num_key_heads=2,
            linear_num_value_heads=heads,
            tie_word_embeddings=False,
        )
    if name == "gemma2":
        return "Gemma2Config", dict(
            num_hidden_layers=num_layers or 2,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=16,
            tie_word_embeddings=True,
            pad_token_id=None,
        )
    if name == "qwen3_moe":
        return "Qwen3MoeConfig", dict(
            num_hidden_layers=num_layers or 2,
            head_dim=head_dim,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden_size,
            decoder_sparse_step=1,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown tiny architecture {name!r}; available: {', '.join(ARCHITECTURES)}")


def build_tiny_architecture(
    out_dir: str | Path,
    name: str,
    hidden_size: int = 64,
    num_layers: int | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny random model of architecture `name` (see ARCHITECTURES) with the real Qwen tokenizer to
    `out_dir` (once: an existing model there is kept). `overrides`: config fields to change (e.g.
    tie_word_embeddings). vLLM's CPU build needs a head size of 64 or 128: hidden_size=256 (4 heads)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    src = shared_data_dir() / "tokenizers" / "qwen2"
    qwen = json.loads((src / "config.json").read_text())
    class_name, fields = _architecture_config(name, hidden_size, num_layers)
    # Qwen2 keeps every field of the real Qwen2 config; the others take the tokenizer's ids from it
    config = (
        {
            k: v
            for k, v in qwen.items()
            if k not in ("_name_or_path", "transformers_version", "architectures", "model_type", "torch_dtype")
        }
        if name == "qwen2"
        else dict(vocab_size=qwen["vocab_size"], bos_token_id=qwen["bos_token_id"], eos_token_id=qwen["eos_token_id"])
    )
    config.update(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        dtype="float32",
    )
    config.update(fields)
    config.update(overrides or {})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**config))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for file in TOKENIZER_FILES:
        if (src / file).exists():
            shutil.copy(src / file, out_dir / file)
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out_dir


def build_tiny_model(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-architecture model with the real Qwen tokenizer to `out_dir`."""
    return build_tiny_architecture(out_dir, "qwen2", hidden_size, num_layers, seed)
