"""Checkpoints in and out, tuili's own Llama-family model, tokenizer and chat template."""

from tuili.models.cache import ContiguousKVCache
from tuili.models.config import LlamaConfig
from tuili.models.llama import CausalLMOutput, LlamaForCausalLM
from tuili.models.loading import default_model_path, load
from tuili.models.model import Model
from tuili.models.tokenizer import Tokenizer

__all__ = [
    "CausalLMOutput",
    "ContiguousKVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Model",
    "Tokenizer",
    "default_model_path",
    "load",
]
