"""Which renderer suits which model (spec 2.9).

Base models use "role_colon"; chat/instruct models use "chat_template" (the tokenizer's own template; the
reference names per-family renderers such as "qwen3_5" or "llama3", which all mean that here).
Besides Hub names `org/name[:suffix]`, two local forms are accepted:
* the embedded name `smollm2-135m-instruct` -> "chat_template";
* a local model folder of the tutorial's model family, Qwen3.5 (config.json `model_type` qwen3_5*) -> the
  tutorial's "role_colon" (spec 2.9: Qwen/Qwen3.5-9B-Base -> role_colon), even when the folder ships Qwen's
  chat template as the base models do (a chat Qwen3.5 folder may pass renderer_name=chat_template);
* any other local model folder or `.gguf` file -> "chat_template" if its tokenizer has a chat template, else
  "role_colon".
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rlhfkit.errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_MODELS = {"smollm2-135m-instruct": "chat_template"}
TUTORIAL_FAMILY_PREFIX = "qwen3_5"  # config.json model_type of Qwen3.5 models (qwen3_5, qwen3_5_text, qwen3_5_moe...)


class ConfigurationError(UserError, ValueError):
    """A model name that does not follow `org/name` or names an unknown organisation."""


_BASE = ["role_colon"]
_CHAT = ["chat_template", "role_colon"]

RECOMMENDED_RENDERERS: dict[str, dict[str, list[str]]] = {
    "Qwen": {
        "Qwen3.5-9B-Base": _BASE,
        "Qwen3.5-35B-A3B-Base": _BASE,
        "Qwen3-8B-Base": _BASE,
        "Qwen3-30B-A3B-Base": _BASE,
        "Qwen2.5-0.5B": _BASE,
        "Qwen2.5-1.5B": _BASE,
        "Qwen3.5-9B": _CHAT,
        "Qwen3-8B": _CHAT,
        "Qwen3-32B": _CHAT,
        "Qwen3-30B-A3B": _CHAT,
        "Qwen3-4B-Instruct-2507": _CHAT,
        "Qwen3-30B-A3B-Instruct-2507": _CHAT,
        "Qwen2.5-0.5B-Instruct": _CHAT,
        "Qwen2.5-1.5B-Instruct": _CHAT,
    },
    "meta-llama": {
        "Llama-3.1-8B": _BASE,
        "Llama-3.1-70B": _BASE,
        "Llama-3.2-1B": _BASE,
        "Llama-3.2-3B": _BASE,
        "Llama-3.1-8B-Instruct": _CHAT,
        "Llama-3.3-70B-Instruct": _CHAT,
        "Llama-3.2-1B-Instruct": _CHAT,
        "Llama-3.2-3B-Instruct": _CHAT,
    },
    "deepseek-ai": {"DeepSeek-V3.1-Base": _BASE, "DeepSeek-V3.1": _CHAT},
    "HuggingFaceTB": {
        "SmolLM2-135M": _BASE,
        "SmolLM2-360M": _BASE,
        "SmolLM2-1.7B": _BASE,
        "SmolLM2-135M-Instruct": _CHAT,
        "SmolLM2-360M-Instruct": _CHAT,
        "SmolLM2-1.7B-Instruct": _CHAT,
    },
    "openai": {"gpt-oss-20b": _CHAT, "gpt-oss-120b": _CHAT},
}


def _local_model_renderer(path: str) -> str:
    folder = Path(path)
    if folder.is_dir():
        model_config = folder / "config.json"
        model_type = json.loads(model_config.read_text()).get("model_type", "") if model_config.exists() else ""
        if model_type.startswith(TUTORIAL_FAMILY_PREFIX):
            return "role_colon"
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        has_template = (
            bool(config.get("chat_template"))
            or (folder / "chat_template.jinja").exists()
            or (folder / "chat_template.json").exists()
        )
    else:  # a .gguf file: ask its tokenizer
        from rlhfkit.tokenizer_utils import get_tokenizer

        has_template = bool(getattr(get_tokenizer(path), "chat_template", None))
    return "chat_template" if has_template else "role_colon"


def get_recommended_renderer_names(model_name: str) -> list[str]:
    if model_name in EMBEDDED_MODELS:
        return [EMBEDDED_MODELS[model_name]]
    if os.path.isdir(model_name) or (model_name.endswith(".gguf") and os.path.exists(model_name)):
        return [_local_model_renderer(model_name)]
    name = model_name.split(":", 1)[0]
    if name.count("/") != 1:
        raise ConfigurationError(
            f"model name {model_name!r} is not of the form 'org/name', an existing local "
            f"model folder or .gguf file, or one of {sorted(EMBEDDED_MODELS)}"
        )
    org, short = name.split("/")
    if org not in RECOMMENDED_RENDERERS:
        raise ConfigurationError(
            f"unknown model organisation {org!r} in {model_name!r}; known: {sorted(RECOMMENDED_RENDERERS)}"
        )
    if short not in RECOMMENDED_RENDERERS[org]:
        raise KeyError(f"unknown model {name!r}; known {org} models: {sorted(RECOMMENDED_RENDERERS[org])}")
    return list(RECOMMENDED_RENDERERS[org][short])


def get_recommended_renderer_name(model_name: str) -> str:
    """The first recommended renderer for `model_name` (see the module docstring)."""
    return get_recommended_renderer_names(model_name)[0]


def warn_if_renderer_not_recommended(model_name: str, renderer_name: str | None) -> None:
    """Log a warning (never raise) if `renderer_name` is not among the model's recommended renderers."""
    if renderer_name is None:
        return
    try:
        recommended = get_recommended_renderer_names(model_name)
    except (ConfigurationError, KeyError) as e:
        logger.warning("cannot check renderer %r for model %r: %s", renderer_name, model_name, e)
        return
    if renderer_name not in recommended:
        logger.warning(
            "renderer %r is not recommended for model %r (recommended: %s)", renderer_name, model_name, recommended
        )
