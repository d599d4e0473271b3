"""tuili (推理): make language models smaller and faster, measure what it cost, and serve them."""

from tuili.errors import DataError, ModelFormatError, TuiliError
from tuili.models import Model, load
from tuili.quant import quantize_

__version__ = "0.1.0"
__all__ = ["DataError", "Model", "ModelFormatError", "TuiliError", "load", "optimize", "quantize_"]


def __getattr__(name: str):
    # tuili.optimize(model, recipe) without importing the pipeline (distillation, pruning) on `import tuili`
    if name == "optimize":
        from tuili.pipeline.optimize import optimize

        return optimize
    raise AttributeError(f"module 'tuili' has no attribute {name!r}")
