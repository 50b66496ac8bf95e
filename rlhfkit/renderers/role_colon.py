"""The `role_colon` renderer for base models (spec 2.3): "User: Hi\n\nAssistant: Hello!\n\nUser:"."""

from __future__ import annotations

import logging
from typing import Sequence

from rlhfkit.renderers.base import (
    Message,
    ParseTermination,
    RenderedConversation,
    RenderedMessage,
    Renderer,
    text_only_content,
)

logger = logging.getLogger(__name__)

STOP_SEQUENCE = "\n\nUser:"
UNUSED_STOP_OVERLAP = "<UNUSED>"  # [quirk] only appended if a supervised example ends on a non-assistant message


class RoleColonRenderer(Renderer):
    """header "Role:", output " " + content + "\\n\\n", stop_overlap "User:" after assistant messages.
    Each piece is tokenised separately; BOS is prepended only if the tokenizer defines one."""

    def render(self, messages: list[Message], next_role: str | None = None) -> RenderedConversation:
        bos = self.tokenizer.bos_token
        prefix = self.encode(bos) if bos is not None else []
        rendered = [self._render_message(m) for m in messages]
        next_header = self.encode(next_role.capitalize() + ":") if next_role is not None else []
        return RenderedConversation(prefix, rendered, next_header)

    def _render_message(self, message: Message) -> RenderedMessage:
        content = text_only_content(message)
        role = message["role"]
        overlap = "User:" if role == "assistant" else UNUSED_STOP_OVERLAP
        return RenderedMessage(
            header=self.encode(role.capitalize() + ":"),
            output=self.encode(" " + content + "\n\n"),
            stop_overlap=self.encode(overlap),
        )

    def get_stop_sequences(self) -> list[str]:
        return [STOP_SEQUENCE]

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]:
        tokens = list(tokens)
        eos = self.tokenizer.eos_token_id
        ended_with_eos = bool(tokens) and eos is not None and tokens[-1] == eos
        if ended_with_eos:
            tokens = tokens[:-1]
        pieces = self.tokenizer.decode(tokens).split(STOP_SEQUENCE)
        content = pieces[0].removeprefix(" ").removesuffix("\n\n")
        n_delimiters = len(pieces) - 1
        if n_delimiters == 0:
            termination = ParseTermination.EOS if ended_with_eos else ParseTermination.MALFORMED
        elif n_delimiters == 1 and not ended_with_eos:
            termination = ParseTermination.STOP_SEQUENCE
        else:
            if n_delimiters > 1:
                logger.warning(
                    "response contains %d stop sequences %r; treating it as malformed", n_delimiters, STOP_SEQUENCE
                )
            termination = ParseTermination.MALFORMED
        return {"role": "assistant", "content": content}, termination
