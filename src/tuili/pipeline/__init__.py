"""Analysis, the optimization job, benchmarks and reports."""

from tuili.pipeline.analysis import Analysis, analyze
from tuili.pipeline.optimize import OptimizeReport, distill_stage, optimize, prune_stage, quantize_stage

__all__ = ["Analysis", "OptimizeReport", "analyze", "distill_stage", "optimize", "prune_stage", "quantize_stage"]
