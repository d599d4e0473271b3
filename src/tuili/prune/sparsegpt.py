"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and update its remaining weights so that its
output on calibration inputs changes as little as possible (optimal brain surgeon, column by column).

With H = 2/n Σ x xᵀ and U the upper Cholesky factor of H⁻¹, columns are visited left to right in
blocks; inside a block the mask is chosen by the OBS saliency w² / U_jj² (over the block for
unstructured sparsity, within each group of M for N:M), and each pruned or kept column's error
(w − q) / U_jj is spread over the columns to its right: W[:, j:] −= err · U[j, j:].
"""

from __future__ import annotations

import torch
from torch import Tensor

from tuili.prune.config import SemiStructured, Target
from tuili.prune.masks import keep_top, nm_mask
from tuili.quant.gptq import dead_inputs_zeroed, inverse_hessian_factor


def sparsegpt(
    w: Tensor, hessian: Tensor, target: Target, damp: float = 0.01, block_size: int = 128
) -> tuple[Tensor, Tensor]:
    """The pruned, updated weight (float, zeros where pruned) and its mask (True = kept)."""
    rows, cols = w.shape
    W, H = dead_inputs_zeroed(w, hessian)
    U = inverse_hessian_factor(H, damp)
    nm = target if isinstance(target, SemiStructured) else None
    if nm is not None and cols % nm.m:
        raise ValueError(f"N:M sparsity needs the input width ({cols}) to be a multiple of M ({nm.m})")
    if nm is not None:
        block_size = max(nm.m, block_size // nm.m * nm.m)  # groups never straddle blocks
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1, Err1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2], torch.zeros(rows, i2 - i1)
        saliency = W1**2 / torch.diag(U1)[None, :] ** 2
        if nm is None:  # blocks' counts add up to exactly round(sparsity × rows × cols) removed
            removed = round(target.sparsity * rows * i2) - round(target.sparsity * rows * i1)
            keep1 = keep_top(saliency, saliency.numel() - removed)
        else:
            keep1 = nm_mask(saliency, nm.n, nm.m)
        for i in range(i2 - i1):
            w_col = W1[:, i]
            q_col = w_col * keep1[:, i]
            err = (w_col - q_col) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q_col
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W * mask, mask
