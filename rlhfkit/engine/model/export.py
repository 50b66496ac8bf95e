"""Exporting an adapter for other tools: a PEFT adapter folder, or a merged Hugging Face model folder.

* adapter: adapter_model.safetensors + adapter_config.json (as PEFT and vLLM read them) + the tokenizer files;
  `peft.PeftModel.from_pretrained(base, folder)` or `AutoPeftModelForCausalLM.from_pretrained(folder)`.
* merged: model.safetensors + config.json + generation_config.json + tokenizer files (with the chat template
  when the tokenizer has one); `AutoModelForCausalLM.from_pretrained(folder)` or `vllm.LLM(folder)`. W + s·BA
  is computed in fp32. When the unembedding was adapted and the base model ties it to the input embeddings,
  the merged model gets its own unembedding matrix and `tie_word_embeddings: false`, so the input embeddings
  stay the base model's (merging into the shared matrix would change them too).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlhfkit.engine.model.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    PEFT_PREFIX,
    load_adapter_tensors,
    merge_adapter,
    peft_config_json,
    read_spec,
)
from rlhfkit.engine.model.base import Precision, load_base_model, load_tokenizer
from rlhfkit.model_files import public_model_name
from rlhfkit.utils.atomic import atomic_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapted_module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Leaf names of the modules an adapter's tensors adapt (PEFT's target_modules)."""
    names = set()
    for key in tensors:
        path = key.removeprefix(PEFT_PREFIX)
        for marker in (".lora_A.", ".lora_B."):
            if marker in path:
                names.add(path.split(marker)[0].rsplit(".", 1)[-1])
    if not names:
        raise ValueError("the adapter has no lora_A/lora_B tensors")
    return sorted(names)


def export_adapter(checkpoint: str | Path, out: str | Path, base_model: str | None = None) -> Path:
    """Write `checkpoint`'s adapter as a PEFT adapter folder at `out` (atomically). Its base_model_name_or_path is
    the name other tools load (the Hub id of an embedded copy, model_files.public_model_name); `base_model`
    overrides it (e.g. a Hub id for a run trained on a local copy)."""
    checkpoint, out = Path(checkpoint), Path(out)
    spec = read_spec(checkpoint)
    tensors = load_adapter_tensors(checkpoint)
    config_path = checkpoint / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    except json.JSONDecodeError:
        config = {}
    config.update(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=adapted_module_names(tensors),
        base_model_name_or_path=base_model if base_model is not None else public_model_name(spec.base_model),
    )
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE))
        (tmp / ADAPTER_CONFIG_FILE).write_text(peft_config_json(config))
        load_tokenizer(spec.base_model).save_pretrained(tmp)
    return out


def export_merged(checkpoint: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the base model with `checkpoint`'s adapter merged into its weights as a Hugging Face model folder
    at `out` (atomically), stored in `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    spec = read_spec(checkpoint)
    model = load_base_model(spec.base_model, Precision(torch.device("cpu"), torch.float32))
    merge_adapter(model, load_adapter_tensors(checkpoint), spec.scale)
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and output.weight is not embedding.weight:
        model.config.tie_word_embeddings = False  # merge_adapter gave the unembedding its own matrix
        text_config = getattr(model.config, "text_config", None)
        if text_config is not None and hasattr(text_config, "tie_word_embeddings"):
            text_config.tie_word_embeddings = False
    model.to(DTYPES[dtype])
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(spec.base_model).save_pretrained(tmp)
    return out
