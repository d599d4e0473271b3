"""Structured output: a request's constraint on what it may generate (a JSON schema, any JSON object, a
regular expression, one of several strings, or a Lark or GBNF grammar), applied in the sampler as a
mask over the vocabulary, step by step.

The grammars are llguidance's (a well-kept Rust library on PyPI, 3 MB with no dependencies; vLLM's
"guidance" back end). Measured beside xgrammar on a 2-core Zen 3 with the default model's 49,152-token
vocabulary (docs/serving.md): xgrammar's masks are faster (median 3-7 against 21-32 µs a token), but
both are a fraction of a percent of a decode step's 14 ms, llguidance compiles a schema in 2 ms
against 3-55 ms, reads the tokenizer's own JSON, and on Linux xgrammar pulls in triton (a GPU
compiler) and apache-tvm-ffi.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

# JSON is written with OpenAI's and json.dumps' separators and no other whitespace unless asked for
# (`whitespace_pattern`): free whitespace lets a small model pad with newlines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 64  # compiled constraints kept per engine


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint (vLLM's `StructuredOutputsParams`): `json`, a JSON schema (a dict or
    its text); `json_object`, any JSON object; `regex`; `choice`, one of these strings; `grammar`, a
    Lark grammar or a GBNF one (llama.cpp's, as vLLM takes it). `whitespace_pattern`: with JSON,
    a regular expression for the whitespace allowed between tokens (default none beyond ", " and
    ": ")."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None  # kept as a tuple
    grammar: str | None = None
    whitespace_pattern: str | None = None

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                "structured output takes exactly one of json, json_object, regex, choice or grammar; "
                f"got {', '.join(given) or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise ValueError(f"a JSON schema is an object, got {type(self.json).__name__}")
        if self.choice is not None:
            choice = (self.choice,) if isinstance(self.choice, str) else tuple(self.choice)
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise ValueError("choice must be a list of non-empty strings")
            object.__setattr__(self, "choice", choice)
        if self.whitespace_pattern is not None and self.json is None and not self.json_object:
            raise ValueError("whitespace_pattern applies to JSON output (json or json_object) only")

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StructuredOutputsParams) and self.key == other.key

    @cached_property
    def key(self) -> str:
        """The constraint as canonical text: what the compiled-grammar cache is keyed by."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}  # fields only, not the cache
        return json.dumps(fields, sort_keys=True, ensure_ascii=False)

    @property
    def kind(self) -> str:
        return next((n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None), "json_object")

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar."""
        import llguidance
        from llguidance.gbnf_to_lark import any_to_lark

        if self.json is not None or self.json_object:
            options: dict[str, Any] = dict(JSON_OPTIONS)
            if self.whitespace_pattern is not None:
                options = {"whitespace_pattern": self.whitespace_pattern, "whitespace_flexible": True}
            schema = {"type": "object"} if self.json_object else self.json
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)  # type: ignore[arg-type]
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(self.grammar or ""))


class Guide:
    """One request's place in its constraint: which tokens may come next, and the tokens so far."""

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def accept(self, token: int) -> None:
        """Advance past a token the mask allowed (ValueError if the grammar refuses it)."""
        if not self.matcher.consume_token(token):
            raise ValueError(f"the structured-output grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The constraint is complete and nothing may follow it."""
        return bool(self.matcher.is_stopped())


class Grammars:
    """Compiled constraints for one model's tokenizer: llguidance's view of the vocabulary built once
    (about half a second, on first use), each distinct constraint compiled once (LRU) and copied for
    every request that uses it. Safe to call from the server's thread and the engine's."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Collection[int]):
        import llguidance

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The constraint's matcher at its start (cached); ValueError with the reason for a grammar,
        schema or regex that cannot be compiled, or one that allows no output at all."""
        import llguidance

        with self._lock:
            if spec.key in self._compiled:
                self._compiled.move_to_end(spec.key)
                return self._compiled[spec.key]
        try:
            text = spec.grammar_text()
        except Exception as e:  # noqa: BLE001 - llguidance's refusal of the schema, said as a bad request
            raise ValueError(f"the {spec.kind} constraint cannot be compiled: {e}") from None
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the {spec.kind} constraint cannot be compiled: {matcher.get_error()}")
        if not self.masks([Guide(matcher.deep_copy())]).any():
            raise ValueError(f"the {spec.kind} constraint allows no output at all: it cannot be satisfied")
        with self._lock:
            self._compiled[spec.key] = matcher
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    def guide(self, spec: StructuredOutputsParams) -> Guide:
        return Guide(self.compile(spec).deep_copy())

    def masks(self, guides: Sequence[Guide]) -> Tensor:
        """(len(guides), vocab_size) bool: the tokens each guide allows next."""
        words = (self.vocab_size + 31) // 32
        bits = np.empty((len(guides), words), dtype=np.int32)
        for i, guide in enumerate(guides):
            guide.matcher.unsafe_compute_mask_ptr(bits[i].ctypes.data, words * 4)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size]
        return torch.from_numpy(allowed.view(bool))
