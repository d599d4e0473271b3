"""Analysis, the optimization job, benchmarks and reports."""

from tuili.pipeline.analysis import Analysis, analyze
from tuili.pipeline.optimize import OptimizeReport, optimize, prune_stage, quantize_stage

__all__ = ["Analysis", "OptimizeReport", "analyze", "optimize", "prune_stage", "quantize_stage"]
