"""Renderers: chat messages <-> tokens. `get_renderer(name, tokenizer)` with name "role_colon" (base models,
spec 2.3) or "chat_template" (the tokenizer's own chat template, for instruct models)."""

from __future__ import annotations

from typing import Any

from rlhfkit.renderers.base import (
    Message,
    ParseTermination,
    RenderedConversation,
    RenderedMessage,
    Renderer,
    RendererError,
    TrainOnWhat,
    get_text_content,
)
from rlhfkit.renderers.chat_template import ChatTemplateRenderer
from rlhfkit.renderers.role_colon import RoleColonRenderer

RENDERERS = {"role_colon": RoleColonRenderer, "chat_template": ChatTemplateRenderer}


def get_renderer(name: str, tokenizer: Any, image_processor: Any = None, model_name: str | None = None) -> Renderer:
    """Build a renderer by name. `image_processor` and `model_name` are accepted for API compatibility."""
    if name not in RENDERERS:
        raise ValueError(f"unknown renderer {name!r}; available: {sorted(RENDERERS)}")
    return RENDERERS[name](tokenizer)


__all__ = [
    "ChatTemplateRenderer",
    "Message",
    "ParseTermination",
    "RENDERERS",
    "RenderedConversation",
    "RenderedMessage",
    "Renderer",
    "RendererError",
    "RoleColonRenderer",
    "TrainOnWhat",
    "get_renderer",
    "get_text_content",
]
