"""Analysis, the optimization job, benchmarks and reports."""

from tuili.pipeline.analysis import Analysis, analyze
from tuili.pipeline.optimize import OptimizeReport, optimize, quantize_stage

__all__ = ["Analysis", "OptimizeReport", "analyze", "optimize", "quantize_stage"]
