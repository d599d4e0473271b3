"""Pruning: importance scores (magnitude, Taylor, Wanda, SparseGPT's OBS), unstructured and N:M
masks that survive fine-tuning, and the sparsity report."""

from tuili.prune.api import prune_
from tuili.prune.config import SemiStructured, Unstructured
from tuili.prune.masks import attach_mask, keep_masks, masks_of, reapply_masks, restore_masks
from tuili.prune.methods import METHODS, Magnitude, SparseGPT, Taylor, Wanda
from tuili.prune.report import SparsityReport, sparsity_report
from tuili.prune.sparsegpt import sparsegpt

__all__ = [
    "METHODS",
    "Magnitude",
    "SemiStructured",
    "SparseGPT",
    "SparsityReport",
    "Taylor",
    "Unstructured",
    "Wanda",
    "attach_mask",
    "keep_masks",
    "masks_of",
    "prune_",
    "reapply_masks",
    "restore_masks",
    "sparsegpt",
    "sparsity_report",
]
