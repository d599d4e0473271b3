"""Pruning: importance scores (magnitude, Taylor, Wanda, SparseGPT's OBS), unstructured and N:M
masks that survive fine-tuning, and the sparsity report."""

from tuili.prune.api import METHODS, prune_
from tuili.prune.config import SemiStructured, Unstructured
from tuili.prune.masks import attach_mask, reapply_masks, restore_masks
from tuili.prune.report import SparsityReport, sparsity_report
from tuili.prune.sparsegpt import sparsegpt

__all__ = [
    "METHODS",
    "SemiStructured",
    "SparsityReport",
    "Unstructured",
    "attach_mask",
    "prune_",
    "reapply_masks",
    "restore_masks",
    "sparsegpt",
    "sparsity_report",
]
