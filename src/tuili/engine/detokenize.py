"""Incremental detokenization: turn a growing list of token ids into text deltas for streaming."""

from __future__ import annotations

from tuili.models.tokenizer import Tokenizer


class TextStream:
    """Feed token ids one at a time; get back only the new text, never half a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def flush(self) -> str:
        """At the end of a generation: the rest, an unfinished character shown as U+FFFD."""
        text = self.tokenizer.decode(self.ids)
        delta, self.text = text[len(self.text):], text
        return delta
