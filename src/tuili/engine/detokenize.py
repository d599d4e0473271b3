"""Incremental detokenization: turn a growing list of token ids into text deltas for streaming."""

from __future__ import annotations

from tuili.models.tokenizer import Tokenizer


class TextStream:
    """Feed token ids one at a time; get back only the new text, never half a UTF-8 character.

    Only a short window is decoded per token (vLLM's prefix/read offsets): the text of
    ids[prefix:] minus that of ids[prefix:read], so a long generation costs O(1) per token and
    tokenizers that render a token differently at the start of a string (SentencePiece's "▁")
    are decoded with the token before them as context.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # ids[prefix:read] is context already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        context = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        if len(text) <= len(context) or text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        delta = text[len(context) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a generation: the rest, an unfinished character shown as U+FFFD."""
        context = self.tokenizer.decode(self.ids[self._prefix : self._read])
        delta = self.tokenizer.decode(self.ids[self._prefix :])[len(context) :]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta


class OutputText:
    """A completion's visible text as its tokens arrive: stop tokens and stop strings end it and
    are cut from it. While stop strings are set, the last len(longest stop) − 1 characters are
    held back, so a stop string split across tokens is never half-streamed before it is seen."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], stop_ids: set[int]):
        self.stream = TextStream(tokenizer)
        self.stop, self.stop_ids = stop, stop_ids
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # what has been emitted
        self.finish_reason: str | None = None
        self._cut = False  # a stop string was found: nothing after it is ever shown

    def add(self, token_id: int) -> str:
        """Take the next token; return the text it releases. Sets `finish_reason` to "stop" at a
        stop token or stop string."""
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            return self.finish()
        self.stream.push(token_id)
        full = self.stream.text
        hits = [i for i in (full.find(s, len(self.text)) for s in self.stop) if i >= 0]  # none ends in emitted text
        if hits:
            self.finish_reason, self._cut = "stop", True
            return self._advance(full[: min(hits)])
        return self._advance(full[: len(full) - self.holdback])

    def finish(self) -> str:
        """The end of the generation (a stop token, max tokens, or abort): whatever is held back."""
        if self._cut:
            return ""
        self.stream.flush()
        return self._advance(self.stream.text)

    def _advance(self, text: str) -> str:
        delta = text[len(self.text) :]
        self.text += delta
        return delta
