"""One-off generation with a model: `generate(model, prompt)` and `stream(model, prompt)`.

Each call runs the engine (tuili.engine.llm) with a KV cache sized to the one request, so there is
one generation path; keep an `LLM` to batch many requests and to reuse the cache between them.
"""

from __future__ import annotations

from collections.abc import Iterator

from tuili.engine.llm import encode_prompt
from tuili.engine.offline import LLM, Completion, Prompt
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.sampling import SamplingParams
from tuili.models.model import Model

BLOCK_SIZE = 16


def generate(model: Model, prompt: Prompt, params: SamplingParams = SamplingParams()) -> Completion:
    """Generate one completion and time it."""
    prompt_ids = encode_prompt(model, prompt)
    return _one_shot(model, prompt_ids, params).generate([prompt_ids], params)[0]


def stream(model: Model, prompt: Prompt, params: SamplingParams = SamplingParams()) -> Iterator[str]:
    """Yield the completion's text piece by piece as tokens are generated."""
    prompt_ids = encode_prompt(model, prompt)
    yield from _one_shot(model, prompt_ids, params).stream(prompt_ids, params)


def _one_shot(model: Model, prompt_ids: list[int], params: SamplingParams) -> LLM:
    tokens = len(prompt_ids) + params.max_tokens
    if tokens > model.config.max_position_embeddings:  # the engine says why; size nothing for it
        tokens = BLOCK_SIZE
    per_token = PagedKVCache.bytes_per_token_of(model)
    blocks = -(-tokens // BLOCK_SIZE)
    return LLM(
        model,
        max_num_seqs=1,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=blocks * BLOCK_SIZE * per_token,
        prefix_caching=False,
        max_num_batched_tokens=max(512, len(prompt_ids)),
    )


__all__ = ["Completion", "encode_prompt", "generate", "stream"]
