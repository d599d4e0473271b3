"""Generation: sampling, the paged KV cache, continuous batching, streaming; `LLM` in vLLM's shape."""

from tuili.engine.async_llm import AsyncLLM
from tuili.engine.generate import generate, stream
from tuili.engine.llm import LLMEngine
from tuili.engine.offline import LLM, Completion, CompletionOutput, EmbeddingRequestOutput, Logprob
from tuili.engine.request import RequestOutput
from tuili.engine.sampling import SamplingParams, TokenLogprob, sample
from tuili.engine.structured import StructuredOutputsParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "Completion",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "TokenLogprob",
    "generate",
    "sample",
    "stream",
]
