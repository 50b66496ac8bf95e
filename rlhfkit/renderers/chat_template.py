"""The `chat_template` renderer: the tokenizer's own chat template (e.g. ChatML for SmolLM2-Instruct, Qwen).

How the pieces are found: the conversation is rendered with the template, with each message's content
replaced by a unique sentinel. The text between two sentinels is split right after the end-of-turn token
(e.g. `<|im_end|>`): the part up to and including it ends the previous message's `output`, the rest is the
next message's `header`. Text before the first header (a default system prompt, say) is the `prefix`;
text after the last end-of-turn token is dropped. So an assistant message renders as
header `"\\n<|im_start|>assistant\\n"` (no leading newline for the first message) and output
`content + "<|im_end|>"`: the end-of-turn token is the last trained token, and it is the stop token.
Content is inserted verbatim (a template that trims or rewrites content is not reproduced).

System messages after the first message: many templates accept a system message only first (Qwen's raise an
error or drop it). For such a template, a later system message (the comparison's "==== Completion A ===="
separators, spec 4.3) is rendered as a user message with the same text, so the separators become user-side
text; its role for training weights stays "system". Whether the template places a later system message is
found once, when the renderer is built.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from rlhfkit.renderers.base import (
    Message,
    ParseTermination,
    RenderedConversation,
    RenderedMessage,
    Renderer,
    RendererError,
    text_only_content,
)


def _sentinel(i: int) -> str:
    return f"<<RLHFKIT_MESSAGE_{i}>>"


class ChatTemplateRenderer(Renderer):
    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise RendererError(
                "the 'chat_template' renderer needs a tokenizer with a chat template; use 'role_colon' for base models"
            )
        self.end_of_turn_id = self._find_end_of_turn_token()
        self.end_of_turn_text = tokenizer.decode([self.end_of_turn_id])
        self.later_system_role = "system" if self._places_later_system_messages() else "user"

    def _render_text(self, conversation: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
        except Exception as e:  # template errors (jinja) for conversations the template rejects
            raise RendererError(
                f"the chat template cannot render roles {[m['role'] for m in conversation]}: {e}"
            ) from e

    def _find_end_of_turn_token(self) -> int:
        """The first special token the template writes after an assistant message's content."""
        text = self._render_text(
            [{"role": "user", "content": _sentinel(0)}, {"role": "assistant", "content": _sentinel(1)}]
        )
        tail = text.split(_sentinel(1), 1)[-1]
        special = set(self.tokenizer.all_special_ids)
        for token in self.encode(tail):
            if token in special:
                return token
        if self.tokenizer.eos_token_id is None:
            raise RendererError("cannot find the chat template's end-of-turn token")
        return self.tokenizer.eos_token_id

    def _places_later_system_messages(self) -> bool:
        """Whether the template renders a system message that follows a user message."""
        try:
            text = self._render_text(
                [
                    {"role": "user", "content": _sentinel(0)},
                    {"role": "system", "content": _sentinel(1)},
                    {"role": "assistant", "content": _sentinel(2)},
                ]
            )
        except RendererError:  # the template rejects it
            return False
        return _sentinel(1) in text

    def _split_after_end_of_turn(self, gap: str, last: bool = False) -> tuple[str, str]:
        """Split template text between two contents into (end of previous output, next header)."""
        marker = self.end_of_turn_text
        i = gap.rfind(marker) if last else gap.find(marker)
        if i < 0:
            return "", gap
        return gap[: i + len(marker)], gap[i + len(marker) :]

    def render(self, messages: list[Message], next_role: str | None = None) -> RenderedConversation:
        contents = [text_only_content(m) for m in messages]
        roles = [m["role"] for m in messages] + ([next_role] if next_role is not None else [])
        skeleton = [
            {"role": self.later_system_role if role == "system" and i > 0 else role, "content": _sentinel(i)}
            for i, role in enumerate(roles)
        ]
        text = self._render_text(skeleton)
        gaps = []
        cursor = 0
        for i, role in enumerate(roles):
            start = text.find(_sentinel(i), cursor)
            if start < 0:
                raise RendererError(f"the chat template does not render message {i} (role {role!r}) here")
            gaps.append(text[cursor:start])
            cursor = start + len(_sentinel(i))
        tail = text[cursor:]
        prefix, first_header = self._split_after_end_of_turn(gaps[0], last=True)
        headers = [first_header]
        endings = []
        for gap in gaps[1:] + [tail]:
            ending, header = self._split_after_end_of_turn(gap)
            endings.append(ending)
            headers.append(header)
        rendered = [
            RenderedMessage(header=self.encode(headers[i]), output=self.encode(contents[i] + endings[i]))
            for i in range(len(messages))
        ]
        next_header = self.encode(headers[len(messages)]) if next_role is not None else []
        return RenderedConversation(self.encode(prefix), rendered, next_header)

    @functools.cached_property
    def _stop_tokens(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [self.end_of_turn_id] + ([eos] if eos is not None and eos != self.end_of_turn_id else [])

    def get_stop_sequences(self) -> list[int]:
        return list(self._stop_tokens)

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]:
        """Ends on a stop token -> STOP_SEQUENCE; no stop token (or text after it) -> MALFORMED."""
        tokens = list(tokens)
        stop_at = next((i for i, t in enumerate(tokens) if t in self._stop_tokens), None)
        if stop_at is None:
            return {"role": "assistant", "content": self.tokenizer.decode(tokens)}, ParseTermination.MALFORMED
        content = self.tokenizer.decode(tokens[:stop_at])
        clean = stop_at == len(tokens) - 1
        return (
            {"role": "assistant", "content": content},
            ParseTermination.STOP_SEQUENCE if clean else ParseTermination.MALFORMED,
        )
