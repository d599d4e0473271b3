"""tuili (推理): make language models smaller and faster, measure what it cost, and serve them.

The verbs: `load`, `quantize_`, `prune_`, `distill_`, `optimize`, `search`, and `LLM` with
`SamplingParams` for generation (vLLM's offline API). In-place verbs end in `_`, take the model
first, then a config, and return the model. The engine, pruning and the pipeline load when first used.
"""

from importlib import import_module

from tuili.errors import DataError, ModelFormatError, RequestFailed, TuiliError
from tuili.models import Model, load
from tuili.quant import quantize_

__version__ = "0.1.0"
_LAZY = {  # name -> module: `import tuili` stays light (no engine, pruning, distillation, pipeline)
    "LLM": "tuili.engine.offline",
    "SamplingParams": "tuili.engine.sampling",
    "StructuredOutputsParams": "tuili.engine.structured",
    "prune_": "tuili.prune.api",
    "distill_": "tuili.distill.trainer",
    "optimize": "tuili.pipeline.optimize",
    "search": "tuili.pipeline.search",
}
__all__ = ["DataError", "Model", "ModelFormatError", "RequestFailed", "TuiliError", "load", "quantize_", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tuili' has no attribute {name!r}")
