"""tuili (推理): make language models smaller and faster, measure what it cost, and serve them."""

from tuili.errors import DataError, ModelFormatError, TuiliError
from tuili.models import Model, load
from tuili.quant import quantize_

__version__ = "0.1.0"
__all__ = ["DataError", "Model", "ModelFormatError", "TuiliError", "load", "quantize_"]
