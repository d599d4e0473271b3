"""Text ↔ token ids with Hugging Face `tokenizers`, plus the model's Jinja chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from tuili.errors import ModelFormatError
from tuili.models.io import read_json, write_json

# GGUF `tokenizer.ggml.pre` -> how text is split before byte-level BPE (as llama.cpp does).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and chat template of its model."""

    def __init__(
        self,
        backend: Backend,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation to the prompt text the model was trained on."""
        if not self.chat_template:
            raise ModelFormatError("this model's tokenizer has no chat template; use plain generation")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_template_error
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except jinja2.TemplateError as e:  # the template rejects these messages, or is itself broken
            raise ValueError(f"the chat template failed on these messages: {e}") from None

    # ---- files ---------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """Read tokenizer.json and tokenizer_config.json (chat template also from chat_template.jinja)."""
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFormatError(
                f"{folder}: no tokenizer.json; tuili needs the fast-tokenizer file that "
                "transformers writes with `tokenizer.save_pretrained(folder)`"
            )
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the Rust parser raises plain Exception subclasses
            raise ModelFormatError(f"{path}: not a valid tokenizer file ({e})") from e
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        return cls(backend, template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def save(self, folder: Path) -> None:
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
        }
        write_json(folder / "tokenizer_config.json", config)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], path: Path | None = None) -> Tokenizer:
        """Build the tokenizer that a GGUF file describes (`tokenizer.ggml.*`): byte-level BPE
        ("gpt2") here; SentencePiece ("llama": Llama 2, Mistral, Gemma ...) through transformers'
        own GGUF converter, which knows each family's conventions (scores, byte fallback, prefix space)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind == "llama" and path is not None:
            return cls._from_gguf_sentencepiece(meta, path)
        if kind != "gpt2":
            raise ModelFormatError(
                f"GGUF tokenizer type {kind!r} is not supported (tuili reads byte-level BPE, 'gpt2', and "
                "SentencePiece, 'llama'); load the model's Hugging Face folder instead"
            )
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise ModelFormatError("the GGUF file has no vocabulary (tokenizer.ggml.tokens)")
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        backend = Backend(
            models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
        )
        backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        special = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, kind in enumerate(types)
            if kind in (_CONTROL, _USER_DEFINED)
        ]
        backend.add_special_tokens(special)
        bos = _token_at(tokens, meta.get("tokenizer.ggml.bos_token_id"))
        eos = _token_at(tokens, meta.get("tokenizer.ggml.eos_token_id"))
        if meta.get("tokenizer.ggml.add_bos_token"):
            _add_bos(backend, bos)
        return cls(backend, meta.get("tokenizer.chat_template"), bos, eos)

    @classmethod
    def _from_gguf_sentencepiece(cls, meta: dict[str, Any], path: Path) -> Tokenizer:
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                convert_gguf_tokenizer,
                get_gguf_tokenizer,
            )
        except ImportError as e:
            raise ModelFormatError(
                f"{path}: its SentencePiece tokenizer is read by transformers' GGUF converter, which is missing "
                f"({e}); pip install 'transformers>=5'"
            ) from None
        try:
            architecture, tokens, config = get_gguf_tokenizer(str(path))
            backend, _ = convert_gguf_tokenizer(architecture, tokens)
        except (ValueError, KeyError) as e:
            raise ModelFormatError(f"{path}: its SentencePiece tokenizer could not be built ({e})") from e
        bos = config.get("bos_token")
        if config.get("add_bos_token"):  # llama.cpp's default for SentencePiece vocabularies
            _add_bos(backend, bos)
        return cls(backend, meta.get("tokenizer.chat_template"), bos, config.get("eos_token"))


def _add_bos(backend: Backend, bos: str | None) -> None:
    """Encodings start with the BOS token, as llama.cpp adds it where the file says so."""
    bos_id = None if bos is None else backend.token_to_id(bos)
    if bos is not None and bos_id is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLITS)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLITS:
        split = pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level])
    return byte_level  # GPT-2's own split


def gguf_pre_name(tokenizer: Tokenizer) -> str:
    """The GGUF `tokenizer.ggml.pre` name of the tokenizer's pre-tokenizer (the inverse of
    `_gguf_pre_tokenizer`); ModelFormatError for a split llama.cpp would not reproduce."""
    pre = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "default"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return _DIGITS_THEN_GPT2[0]
    if kinds == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex")
        for name, split in _SPLITS.items():
            if regex == split:
                return name
    raise ModelFormatError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no GGUF name that "
        "tuili knows; llama.cpp would split text differently"
    )


def _token_at(tokens: list[str], index: int | None) -> str | None:
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def _token_text(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _raise_template_error(message: str):
    raise ModelFormatError(f"chat template: {message}")
