"""Renderer interface: chat messages <-> tokens (spec section 2).

A renderer turns a conversation into three token pieces per message (header, output, stop_overlap) and
builds two things from them: generation prompts (to sample the next message) and supervised examples
(tokens + a 0/1 weight per token saying which tokens are trained).
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence, TypedDict

import numpy as np

from rlhfkit.engine.types import EncodedTextChunk, ModelInput

logger = logging.getLogger(__name__)


class RendererError(ValueError):
    """A message the renderer cannot render (bad role, non-text content, misuse of `trainable`)."""


class Message(TypedDict, total=False):
    """A chat message: `role` and `content` (a string, or a list of parts like {"type": "text", "text": ...}).
    `trainable` is only legal with TrainOnWhat.CUSTOMIZED."""

    role: str
    content: str | list[dict[str, Any]]
    trainable: bool
    name: str
    tool_calls: list[Any]
    tool_call_id: str


class TrainOnWhat(str, enum.Enum):
    """Which message outputs get weight 1 in a supervised example (spec 2.5)."""

    LAST_ASSISTANT_MESSAGE = "last_assistant_message"
    LAST_ASSISTANT_TURN = "last_assistant_turn"
    ALL_ASSISTANT_MESSAGES = "all_assistant_messages"
    ALL_MESSAGES = "all_messages"
    ALL_TOKENS = "all_tokens"
    ALL_USER_AND_SYSTEM_MESSAGES = "all_user_and_system_messages"
    CUSTOMIZED = "customized"


class ParseTermination(str, enum.Enum):
    """How a sampled response ended (spec 2.7)."""

    STOP_SEQUENCE = "stop_sequence"
    EOS = "eos"
    MALFORMED = "malformed"

    @property
    def is_clean(self) -> bool:
        return self is not ParseTermination.MALFORMED

    @property
    def is_stop_sequence(self) -> bool:
        return self is ParseTermination.STOP_SEQUENCE


def get_text_content(message: Message) -> str:
    """The text of a message: its string content, or the concatenated text parts of a list content."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    raise RendererError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def text_only_content(message: Message) -> str:
    """The content of a text-only message (a string or exactly one text part); anything else raises."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RendererError(f"a message must be a dict with a string 'role', got {message!r:.200}")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and len(content) == 1 and content[0].get("type") == "text":
        return content[0]["text"]
    raise RendererError(f"only text content is supported, got {content!r:.200}")


@dataclass
class RenderedMessage:
    """Token pieces of one message: `header` (role marker), `output` (what the model generates for the
    turn) and `stop_overlap` (appended only after the last message of a supervised example)."""

    header: list[int]
    output: list[int]
    stop_overlap: list[int] = field(default_factory=list)


@dataclass
class RenderedConversation:
    """`prefix` (BOS or template preamble), one RenderedMessage per message, and the header of a next
    message when one was asked for."""

    prefix: list[int]
    messages: list[RenderedMessage]
    next_header: list[int] = field(default_factory=list)


def _model_input(pieces: Sequence[Sequence[int]]) -> ModelInput:
    return ModelInput(tuple(EncodedTextChunk(tuple(p)) for p in pieces if len(p) > 0))


class Renderer(ABC):
    """Base class: subclasses implement `render` (token pieces), `get_stop_sequences` and `parse_response`."""

    has_extension_property = True  # history is never rewritten, so one supervised example per conversation

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    @abstractmethod
    def render(self, messages: list[Message], next_role: str | None = None) -> RenderedConversation:
        """Token pieces of `messages`, plus the header of an empty `next_role` message if given."""

    @abstractmethod
    def get_stop_sequences(self) -> list[str] | list[int]: ...

    @abstractmethod
    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]: ...

    def build_generation_prompt(
        self, messages: list[Message], role: str = "assistant", prefill: str | None = None
    ) -> ModelInput:
        """prefix + (header, output) of every message + header of an empty `role` message + prefill."""
        rendered = self.render(messages, next_role=role)
        pieces = [rendered.prefix]
        for m in rendered.messages:
            pieces += [m.header, m.output]
        pieces.append(rendered.next_header)
        if prefill:
            pieces.append(self.encode(prefill))
        return _model_input(pieces)

    def build_supervised_example(
        self,
        messages: list[Message],
        train_on_what: TrainOnWhat | str = TrainOnWhat.LAST_ASSISTANT_MESSAGE,
    ) -> tuple[ModelInput, np.ndarray]:
        """Tokens of the conversation and a 0/1 int64 weight per token (spec 2.5)."""
        train_on_what = TrainOnWhat(train_on_what)
        if not messages:
            raise RendererError("cannot build a supervised example from an empty conversation")
        if train_on_what != TrainOnWhat.CUSTOMIZED and any("trainable" in m for m in messages):
            raise AssertionError("'trainable' is only allowed with TrainOnWhat.CUSTOMIZED")
        rendered = self.render(messages)
        trained = _trained_outputs(messages, train_on_what)
        pieces: list[tuple[list[int], int]] = [(rendered.prefix, 0)]
        for i, (m, train_output) in enumerate(zip(rendered.messages, trained)):
            pieces.append((m.header, int(train_on_what == TrainOnWhat.ALL_TOKENS)))
            pieces.append((m.output, int(train_output)))
            if i == len(messages) - 1:
                pieces.append((m.stop_overlap, int(train_output)))
        model_input = _model_input([p for p, _ in pieces])
        weights = np.concatenate([np.full(len(p), w, dtype=np.int64) for p, w in pieces])
        self._zero_generation_prompt_prefix(messages, train_on_what, model_input, weights)
        return model_input, weights

    def build_supervised_examples(
        self,
        messages: list[Message],
        train_on_what: TrainOnWhat | str = TrainOnWhat.LAST_ASSISTANT_MESSAGE,
    ) -> list[tuple[ModelInput, np.ndarray]]:
        return [self.build_supervised_example(messages, train_on_what)]

    def create_conversation_prefix_with_tools(self, *args: Any, **kwargs: Any) -> list[Message]:
        raise NotImplementedError(f"{type(self).__name__} does not support tool calling")

    def _zero_generation_prompt_prefix(
        self, messages: list[Message], train_on_what: TrainOnWhat, model_input: ModelInput, weights: np.ndarray
    ) -> None:
        """Post-pass: for the LAST_ASSISTANT_* modes, never train on the generation prompt of the boundary
        assistant message, even if the template renders history differently."""
        if train_on_what == TrainOnWhat.LAST_ASSISTANT_MESSAGE:
            boundary = len(messages) - 1
        elif train_on_what == TrainOnWhat.LAST_ASSISTANT_TURN:
            boundary = _last_user_index(messages) + 1
        else:
            return
        if boundary >= len(messages) or messages[boundary]["role"] != "assistant":
            return
        prompt = self.build_generation_prompt(messages[:boundary]).to_ints()
        if model_input.to_ints()[: len(prompt)] == prompt:
            weights[: len(prompt)] = 0


def _last_user_index(messages: list[Message]) -> int:
    """Index of the last user message among all but the final message (-1 if none)."""
    return max((i for i, m in enumerate(messages[:-1]) if m["role"] == "user"), default=-1)


def _trained_outputs(messages: list[Message], mode: TrainOnWhat) -> list[bool]:
    last = len(messages) - 1
    last_user = _last_user_index(messages)
    result = []
    for i, m in enumerate(messages):
        role = m["role"]
        if mode == TrainOnWhat.LAST_ASSISTANT_MESSAGE:
            trained = i == last and role == "assistant"
        elif mode == TrainOnWhat.LAST_ASSISTANT_TURN:
            trained = role == "assistant" and i >= last_user + 1
        elif mode == TrainOnWhat.ALL_ASSISTANT_MESSAGES:
            trained = role == "assistant"
        elif mode in (TrainOnWhat.ALL_MESSAGES, TrainOnWhat.ALL_TOKENS):
            trained = True
        elif mode == TrainOnWhat.ALL_USER_AND_SYSTEM_MESSAGES:
            trained = role in ("user", "system")
        else:  # CUSTOMIZED
            if "trainable" not in m:
                raise RendererError(f"message {i} has no 'trainable' field (required by TrainOnWhat.CUSTOMIZED)")
            trained = bool(m["trainable"])
        result.append(trained)
    return result
