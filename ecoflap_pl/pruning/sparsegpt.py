"""SparseGPT (Frantar & Alistarh, 2023): mask selection with optimal-brain-surgeon weight updates."""

from __future__ import annotations

import logging

import torch

from ecoflap_pl.pruning.masks import matrix_count_mask, nm_mask, pruned_count, row_count_mask, row_counts

logger = logging.getLogger(__name__)
_MAX_DAMPING_RETRIES = 6


def _inverse_hessian_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damping · mean(diag H)``, retrying with 10× more."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    for attempt in range(_MAX_DAMPING_RETRIES):
        damped = hessian + (damping * 10**attempt) * mean_diag * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                if attempt:
                    logger.debug("SparseGPT: Cholesky needed damping %g", damping * 10**attempt)
                return upper
    raise FloatingPointError("SparseGPT: the Hessian is not positive definite even with 1e5x damping.")


def _share(total: torch.Tensor, start: int, end: int, cols: int) -> torch.Tensor:
    """The part of ``total`` pruned weights that falls in columns ``[start, end)`` of ``cols``: differences of the
    nearest integers to ``total · x / cols``, so the column blocks' shares sum to ``total`` exactly."""
    half = cols // 2
    return (total * end + half) // cols - (total * start + half) // cols


def sparsegpt_prune_(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    *,
    comparison: str = "per_matrix",
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damping: float = 0.01,
) -> torch.Tensor:
    """Prune ``weight`` in place with SparseGPT and return its mask (``True`` = kept).

    With ``H = Σ x xᵀ`` over the calibration inputs (any positive scale: damping is relative), columns are
    processed left to right in blocks of ``block_size``. At the start of a block the pruning metric
    ``w_ij² / [U]_jj²`` (``U`` the upper Cholesky factor of ``H⁻¹``) picks the mask inside the block
    (per row or over the block; or N:M every M columns), then each column ``j`` is quantised to its masked value
    ``q_j`` and the error ``(w_j − q_j) / U_jj`` is propagated to the remaining columns through row ``j`` of ``U``.

    Exactly ``round(numel · sparsity)`` weights are pruned, spread over the column blocks in proportion to their
    widths (the nearest integers of the running total). ``"per_matrix"`` (the original SparseGPT) ranks the metric
    across all rows of each column block; ``"per_row"`` fixes every row's total first (:func:`row_counts` on the
    metric before any update: equal up to one, the extra weights to the rows whose next weight is cheapest) and
    ranks inside each row of each block.

    Args:
        weight: ``[out, in]`` Linear weight, modified in place.
        gram: ``[in, in]`` fp32 ``Σ x xᵀ`` of the layer's inputs.
        sparsity: fraction of weights to prune (ignored for N:M).
        comparison: ``"per_matrix"`` (across all rows of each column block, the original) or ``"per_row"``.
        n_m: ``(N, M)`` for semi-structured sparsity.
        block_size: columns per block.
        damping: fraction of the mean Hessian diagonal added to the diagonal.
    """
    # A caller's autocast (a mixed-precision notebook cell) would run the updates' matmuls in 16 bits.
    with torch.autocast(weight.device.type, enabled=False):
        rows, cols = weight.shape
        work = weight.detach().float().clone()
        hessian = gram.detach().float().clone()
        dead = hessian.diagonal() == 0
        hessian[dead, dead] = 1.0
        work[:, dead] = 0.0
        factor = _inverse_hessian_factor(hessian, damping)
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
        total = pruned_count(weight.numel(), sparsity)
        if n_m is None and comparison == "per_row":
            per_row = row_counts(work.square() / factor.diagonal().square().unsqueeze(0), total)

        for start in range(0, cols, block_size):
            end = min(start + block_size, cols)
            block = work[:, start:end].clone()
            block_factor = factor[start:end, start:end]
            block_diag = block_factor.diagonal()
            errors = torch.zeros_like(block)
            block_pruned = torch.zeros_like(block, dtype=torch.bool)
            if n_m is None:
                metric = block.square() / block_diag.square().unsqueeze(0)
                if comparison == "per_row":
                    block_pruned = ~row_count_mask(metric, _share(per_row, start, end, cols))
                else:
                    count = int(_share(torch.tensor(total, device="cpu"), start, end, cols))
                    block_pruned = ~matrix_count_mask(metric, count)
            for j in range(end - start):
                if n_m is not None and j % n_m[1] == 0:
                    span = slice(j, j + n_m[1])
                    metric = block[:, span].square() / block_diag[span].square().unsqueeze(0)
                    block_pruned[:, span] = ~nm_mask(metric, *n_m)
                column = block[:, j]
                quantised = column.masked_fill(block_pruned[:, j], 0.0)
                error = (column - quantised) / block_factor[j, j]
                block[:, j:] -= error.unsqueeze(1) * block_factor[j, j:].unsqueeze(0)
                block[:, j] = quantised
                errors[:, j] = error
            work[:, start:end] = block
            work[:, end:] -= errors @ factor[start:end, end:]
            pruned[:, start:end] = block_pruned

        with torch.no_grad():
            weight.copy_(work.masked_fill(pruned, 0.0).to(weight.dtype))
        return ~pruned
