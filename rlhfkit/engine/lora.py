"""LoRA adapters through PEFT: which modules get them, saving/loading them, merging them into weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhfkit.engine.integrity import verify_checkpoint
from rlhfkit.errors import CheckpointError

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
META_FILE = "rlhfkit_state.json"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    base_model: str
    rank: int = 32
    alpha: int = 32  # the cookbook's assumed alpha (spec §9.3)
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_module_names(model: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """Leaf names of the linear projections to adapt: attention and/or MLP projections inside the decoder
    layers, and the unembedding when asked."""
    names: set[str] = set()
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in f".{path}":
            continue
        parent = path.rsplit(".", 1)[0].lower()
        is_attn = "attn" in parent or "attention" in parent
        is_mlp = "mlp" in parent or "feed_forward" in parent
        if (is_attn and spec.train_attn) or (is_mlp and spec.train_mlp):
            names.add(path.rsplit(".", 1)[-1])
    if spec.train_unembed:
        output = model.get_output_embeddings()
        for path, module in model.named_modules():
            if module is output:
                names.add(path)
    if not names:
        raise ValueError("LoRA: no target modules selected (train_mlp, train_attn and train_unembed all False?)")
    return sorted(names)


def add_lora(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """Wrap the model with fresh LoRA adapters (dropout 0, adapters kept in fp32)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                        target_modules=target_module_names(model, spec), bias="none")
    seed = 0 if spec.seed is None else spec.seed
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tied.*")
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def adapter_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors, keyed as PEFT saves them (PeftModel.from_pretrained can read the files we write)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous().cpu() for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}


def load_adapter_state(peft_model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights do not match the model: unexpected keys {unexpected[:3]}...")


def save_adapter(folder: Path, tensors: dict[str, torch.Tensor], spec: LoraSpec, peft_config: dict, kind: str,
                 extra: dict | None = None) -> None:
    save_file(tensors, str(folder / ADAPTER_FILE))
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, default=str))
    meta = {"kind": kind, "lora": asdict(spec), **(extra or {})}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def read_meta(folder: str | Path) -> dict:
    """The checkpoint's metadata, after checking every file of the checkpoint against its checksums (every
    load starts here, so a damaged checkpoint is never loaded)."""
    folder = Path(folder)
    verify_checkpoint(folder, legacy_marker=META_FILE)
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{folder} is not an rlhfkit checkpoint (no {META_FILE}); expected a directory "
                              f"written by save_state or save_weights_for_sampler")
    try:
        return json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: damaged ({e})") from None


def load_adapter_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a checkpoint whose files match their checksums."""
    verify_checkpoint(folder, legacy_marker=META_FILE)
    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"checkpoint file {path} cannot be read ({e})") from None


def merge_adapter(model: torch.nn.Module, tensors: dict[str, torch.Tensor], scale: float) -> None:
    """W ← W + scale · B A for every adapted module of a plain (non-PEFT) model, in place. Tied output
    embeddings get their own merged copy so the input embeddings stay untouched."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        path = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in path:
                pairs.setdefault(path.split(marker)[0], {})[part] = value
    modules = dict(model.named_modules())
    for path, ab in pairs.items():
        module = modules[path]
        weight = module.weight
        delta = (ab["lora_B"].float() @ ab["lora_A"].float()) * scale
        merged = (weight.detach().float() + delta.to(weight.device)).to(weight.dtype)
        module.weight = torch.nn.Parameter(merged, requires_grad=False)  # a new tensor: unties shared weights
