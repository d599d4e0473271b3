"""Generation: sampling, the paged KV cache, continuous batching, streaming."""

from tuili.engine.async_llm import AsyncLLM
from tuili.engine.generate import Completion, generate, stream
from tuili.engine.llm import LLM, LLMEngine
from tuili.engine.request import RequestOutput, TokenLogprob
from tuili.engine.sampling import SamplingParams, sample

__all__ = [
    "LLM",
    "AsyncLLM",
    "Completion",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "generate",
    "sample",
    "stream",
]
