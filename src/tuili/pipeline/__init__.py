"""Analysis, the optimization job and its stages, benchmarks and reports."""

from tuili.pipeline.analysis import Analysis, analyze
from tuili.pipeline.optimize import OptimizeReport, optimize
from tuili.pipeline.stages import DistillStage, PruneStage, QuantizeStage

__all__ = ["Analysis", "DistillStage", "OptimizeReport", "PruneStage", "QuantizeStage", "analyze", "optimize"]
