"""Incremental detokenization: turn a growing list of token ids into text deltas for streaming."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from tuili.models.tokenizer import Tokenizer


class TextStream:
    """Feed token ids one at a time; get back only the new text, never half a UTF-8 character.

    `tokenizers.decoders.DecodeStream` does the work (the prefix/read-offset window vLLM and TGI
    use): each token costs a short decode, and tokenizers that render a token differently at the
    start of a string (SentencePiece's "▁") see the token before it as context. `flush` adds what
    it still holds back at the end: an unfinished character, shown as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        delta = self._stream.step(self.tokenizer.backend, token_id) or ""
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a generation: the rest, an unfinished character shown as U+FFFD."""
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
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
