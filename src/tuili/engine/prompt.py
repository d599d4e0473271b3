"""What the engine takes as a prompt (text, token ids, or chat messages) and its token ids."""

from __future__ import annotations

from typing import Any, cast

from tuili.models.model import Model

Prompt = str | list[int] | list[dict[str, Any]]  # text, token ids, or chat messages (the engine's own forms)


def encode_prompt(model: Model, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: text, ids, or chat messages (rendered with the chat template)."""
    if isinstance(prompt, str):
        return model.tokenizer.encode(prompt)
    if prompt and isinstance(prompt[0], dict):
        text = model.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        return model.tokenizer.encode(text, add_special_tokens=False)
    return list(cast(list[int], prompt))
