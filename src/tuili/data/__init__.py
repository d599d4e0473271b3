"""Text to token windows: the built-in corpus, user files, evaluation windows, calibration samples."""

from tuili.data.corpus import builtin_text
from tuili.data.perplexity import Perplexity, perplexity
from tuili.data.sources import load_text
from tuili.data.windows import calibration_samples, eval_windows

__all__ = ["Perplexity", "builtin_text", "calibration_samples", "eval_windows", "load_text", "perplexity"]
