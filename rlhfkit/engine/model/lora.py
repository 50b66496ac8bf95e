"""LoRA adapters through PEFT: which modules get them, saving/loading them, merging them into weights.

A saved adapter folder is a valid PEFT adapter (`peft.PeftModel.from_pretrained(base, folder)` and vLLM's LoRA
loader read it as is): `adapter_model.safetensors` + `adapter_config.json` (task_type CAUSAL_LM, target_modules
a list, base_model_name_or_path the name the user gave, or the Hub id of an embedded copy). rlhfkit adds `rlhfkit_state.json` (the LoraSpec and
loop state; a base model inside the run folder also relative to the checkpoint, see rlhfkit.model_files); a folder without it (an adapter trained elsewhere) is read from adapter_config.json alone."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhfkit.engine.model.integrity import verify_checkpoint
from rlhfkit.errors import CheckpointError
from rlhfkit.model_files import portable_base_record, public_model_name, resolve_portable_base

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
META_FILE = "rlhfkit_state.json"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    base_model: str
    rank: int = 32
    alpha: float = 32  # the cookbook's assumed alpha (spec §9.3)
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_module_names(model: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """Leaf names of the linear projections to adapt: attention and/or MLP projections inside the decoder
    layers, and the unembedding when asked.

    * Token mixers count as attention, linear attention included on purpose: Qwen3.5's Gated DeltaNet block
      (`linear_attn`: in_proj_qkv, in_proj_z, in_proj_a, in_proj_b, out_proj) is adapted with train_attn, like
      full attention's q/k/v/o (LoRA on every weight matrix, as the reference service does).
    * Mixture-of-experts routers (a linear layer beside an `experts` module) are left out on purpose: adapting
      the router changes which experts run. Experts stored as fused 3-D parameters (Qwen3-MoE, Mixtral in
      transformers 5) are not linear layers, so an MoE MLP gets adapters only on its dense linear parts (a
      shared expert, say)."""
    names: set[str] = set()
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in f".{path}":
            continue
        parent_path = path.rsplit(".", 1)[0]
        if hasattr(modules[parent_path], "experts"):  # a router
            continue
        parent = parent_path.lower()
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


def fused_lora_forward(module: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT LoRA Linear's output W x + b + scale · B A x in two calls: the low-rank product A x, then one
    addmm that adds scale · B (A x) to the base output inside the matrix multiply. PEFT's own forward casts
    x to the adapters' fp32 (which autocast casts back to bf16), then scales and adds the full-width output
    in separate passes: on a bf16 CPU those copies and elementwise passes took more time than the matmuls
    (benchmarks/results/cpu-bf16.md). Same maths, same dtypes under autocast (bf16 products, fp32 adapter
    parameters and gradients); anything else (merged or disabled adapters, several adapters, no autocast
    with dtypes that differ) takes PEFT's forward."""
    adapters = module.active_adapters
    plain = (
        not args
        and not kwargs
        and not module.disable_adapters
        and not module.merged
        and len(adapters) == 1
        and adapters[0] in module.lora_A
        and adapters[0] not in module.lora_variant
    )
    if plain:
        lora_a, lora_b = module.lora_A[adapters[0]].weight, module.lora_B[adapters[0]].weight
        plain = torch.is_autocast_enabled(x.device.type) or x.dtype == lora_a.dtype == module.base_layer.weight.dtype
    if not plain:
        return type(module).forward(module, x, *args, **kwargs)
    result = module.base_layer(x)
    low = torch.nn.functional.linear(x, lora_a)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        low.reshape(-1, low.shape[-1]),
        lora_b.t(),
        alpha=module.scaling[adapters[0]],
    )
    return out.view(result.shape)


def add_lora(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """Wrap the model with fresh LoRA adapters (dropout 0, adapters kept in fp32), each adapted Linear layer
    computing through fused_lora_forward."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear

    import warnings

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=target_module_names(model, spec),
        bias="none",
    )
    seed = 0 if spec.seed is None else spec.seed
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tied.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    # PEFT records the local folder the weights came from; record the portable name instead (the Hub id of an
    # embedded copy, which other tools can load; rlhfkit_state.json keeps the name the user gave).
    peft_model.peft_config["default"].base_model_name_or_path = public_model_name(spec.base_model)
    for _name, param in peft_model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
    for module in peft_model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(fused_lora_forward, module)
    return peft_model


def adapter_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors, keyed as PEFT saves them (PeftModel.from_pretrained can read the files we write)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {k: v.detach().clone().contiguous().cpu() for k, v in state.items()}


def load_adapter_state(peft_model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights do not match the model: unexpected keys {unexpected[:3]}...")


def peft_config_json(peft_config: dict) -> str:
    """adapter_config.json's text as PEFT and vLLM read it: sets (target_modules) as sorted lists, enums as
    their values."""

    def plain(value):
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value.value if hasattr(value, "value") and isinstance(value, str) else value

    return json.dumps({k: plain(v) for k, v in peft_config.items()}, indent=2, sort_keys=True)


def save_adapter(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    spec: LoraSpec,
    peft_config: dict,
    kind: str,
    extra: dict | None = None,
) -> None:
    save_file(tensors, str(folder / ADAPTER_FILE))
    (folder / ADAPTER_CONFIG_FILE).write_text(peft_config_json(peft_config))
    meta = {"kind": kind, "lora": asdict(spec), **portable_base_record(spec.base_model, folder), **(extra or {})}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def is_adapter_folder(folder: str | Path) -> bool:
    """An rlhfkit checkpoint or a plain PEFT adapter folder."""
    folder = Path(folder)
    return folder.is_dir() and ((folder / META_FILE).exists() or (folder / ADAPTER_CONFIG_FILE).exists())


def read_meta(folder: str | Path) -> dict:
    """rlhfkit_state.json of an rlhfkit checkpoint, after checking every file of the checkpoint against its
    checksums (every load starts here, so a damaged checkpoint is never loaded); for a plain PEFT adapter folder,
    the same keys derived from its adapter_config.json ({"kind": "peft", "lora": ...})."""
    folder = Path(folder)
    verify_checkpoint(folder, legacy_marker=(META_FILE, ADAPTER_CONFIG_FILE))
    meta_path = folder / META_FILE
    if meta_path.exists():
        try:
            return resolve_portable_base(json.loads(meta_path.read_text()), folder)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_path}: damaged ({e})") from None
    if (folder / ADAPTER_CONFIG_FILE).exists():
        return {"kind": "peft", "lora": asdict(spec_from_peft_config(folder))}
    raise CheckpointError(
        f"{folder} is neither an rlhfkit checkpoint (no {META_FILE}) nor a PEFT adapter folder "
        f"(no {ADAPTER_CONFIG_FILE}); expected a directory written by save_state, "
        f"save_weights_for_sampler or peft's save_pretrained"
    )


ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "dense")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "c_proj", "w1", "w2", "w3")
UNEMBED_NAMES = ("lm_head", "embed_out", "output")


def spec_from_peft_config(folder: str | Path) -> LoraSpec:
    """A LoraSpec for a PEFT LoRA adapter trained elsewhere: base model, rank and alpha from adapter_config.json;
    which module groups it adapts from its target_modules (a training client adapts whole groups: modules of a
    group the adapter lacks start at zero)."""
    path = Path(folder) / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    for field in ("base_model_name_or_path", "r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise ValueError(f"{path}: field {field!r} is missing; a PEFT LoRA adapter config needs it")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config['peft_type']!r}; only LoRA adapters are supported")
    unsupported = [
        k
        for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
        if config.get(k)
    ]
    if unsupported or config.get("bias", "none") != "none":
        raise ValueError(
            f"{path}: unsupported LoRA options {unsupported or ['bias']}; rlhfkit merges plain LoRA "
            f"(W + alpha/r · BA) only"
        )
    targets = config["target_modules"]
    if isinstance(targets, str):
        raise ValueError(f"{path}: target_modules is a pattern string ({targets!r}); expected a list of names")
    leaves = {str(t).rsplit(".", 1)[-1] for t in targets}
    spec = LoraSpec(
        base_model=config["base_model_name_or_path"],
        rank=int(config["r"]),
        alpha=config["lora_alpha"],
        train_attn=bool(leaves & set(ATTN_NAMES)),
        train_mlp=bool(leaves & set(MLP_NAMES)),
        train_unembed=bool(leaves & set(UNEMBED_NAMES)),
    )
    if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
        raise ValueError(
            f"{path}: target_modules {sorted(leaves)} name no attention, MLP or unembedding projection rlhfkit knows"
        )
    return spec


def read_spec(folder: str | Path) -> LoraSpec:
    """The LoraSpec of an rlhfkit checkpoint or a PEFT adapter folder."""
    return LoraSpec(**read_meta(folder)["lora"])


def load_adapter_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a checkpoint whose files match their checksums."""
    verify_checkpoint(folder, legacy_marker=(META_FILE, ADAPTER_CONFIG_FILE))
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
