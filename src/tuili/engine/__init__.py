"""Generation: sampling, KV caching, streaming."""

from tuili.engine.generate import Completion, generate, stream
from tuili.engine.sampling import SamplingParams, sample

__all__ = ["Completion", "SamplingParams", "generate", "sample", "stream"]
