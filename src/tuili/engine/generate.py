"""One-off generation with a model: `generate(model, prompt)` and `stream(model, prompt)`.

Each call runs the engine (tuili.engine.llm) with a KV cache sized to the one request, so there is
one generation path; keep an `LLM` to batch many requests and to reuse the cache between them.
"""

from __future__ import annotations

from collections.abc import Iterator

from tuili.engine.offline import LLM, Completion, Prompt, prompt_ids
from tuili.engine.paged_cache import PagedKVCache
from tuili.engine.sampling import SamplingParams
from tuili.models.model import Model

BLOCK_SIZE = 16


def generate(model: Model, prompt: Prompt, params: SamplingParams = SamplingParams()) -> Completion:
    """Generate one completion and time it."""
    ids = prompt_ids(model, prompt)
    return _one_shot(model, ids, params).generate([ids], params)[0]


def stream(model: Model, prompt: Prompt, params: SamplingParams = SamplingParams()) -> Iterator[str]:
    """Yield the completion's text piece by piece as tokens are generated."""
    ids = prompt_ids(model, prompt)
    yield from _one_shot(model, ids, params).stream(ids, params)


def _one_shot(model: Model, ids: list[int], params: SamplingParams) -> LLM:
    tokens = len(ids) + params.max_tokens
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
        max_num_batched_tokens=max(512, len(ids)),
    )


__all__ = ["Completion", "generate", "prompt_ids", "stream"]
