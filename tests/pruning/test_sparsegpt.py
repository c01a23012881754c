"""SparseGPT against a slow optimal-brain-surgeon reference that re-inverts the Hessian at every column."""

import pytest
import torch

from ecoflap_pl.pruning.config import PruningConfig
from ecoflap_pl.pruning.sparsegpt import sparsegpt_prune_


def _nearest(numerator, denominator):
    """round(numerator / denominator) with halves up, in exact integer arithmetic."""
    return (2 * numerator + denominator) // (2 * denominator)


def _lowest_first(entries, metric):
    """Entries (tuples of indices) ordered by metric, then position: a stable sort."""
    return sorted(entries, key=lambda entry: (float(metric[entry]), entry))


def reference_sparsegpt(weight, hessian, sparsity, block_size, comparison, n_m):
    """The original SparseGPT, slowly: column j is removed with OBS using inv(H[j:, j:]) (the Hessian of the columns
    still free), the metric w² / inv(H[j:, j:])[0, 0] picks the mask of each column block when the block starts.
    Counts: round(numel · s) in all, each block's share the nearest integers of the running total; per_matrix ranks
    over all rows of the block (as the original), per_row gives row r its share of that row's own total."""
    work = weight.clone().double()
    hessian = hessian.clone().double()
    hessian += 0.01 * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=torch.float64)
    rows, cols = work.shape
    inverse_diag = [torch.linalg.inv(hessian[j:, j:])[0, 0] for j in range(cols)]
    total = round(rows * cols * sparsity)
    if comparison == "per_row":
        metric = torch.stack([work[:, j] ** 2 / inverse_diag[j] for j in range(cols)], dim=1)
        base, extra = divmod(total, rows)
        ranked = [_lowest_first([(r, c) for c in range(cols)], metric) for r in range(rows)]
        by_next = sorted(range(rows), key=lambda r: (float(metric[ranked[r][base]]), r))
        row_total = [base + (r in by_next[:extra]) for r in range(rows)]
    pruned = torch.zeros_like(work, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        metric = torch.zeros_like(work)
        for j in range(start, end):
            metric[:, j] = work[:, j] ** 2 / inverse_diag[j]
        if n_m is None and comparison == "per_matrix":
            share = _nearest(total * end, cols) - _nearest(total * start, cols)
            block = [(r, c) for r in range(rows) for c in range(start, end)]
            for entry in _lowest_first(block, metric)[:share]:
                pruned[entry] = True
        elif n_m is None:
            for r in range(rows):
                share = _nearest(row_total[r] * end, cols) - _nearest(row_total[r] * start, cols)
                for entry in _lowest_first([(r, c) for c in range(start, end)], metric)[:share]:
                    pruned[entry] = True
        for j in range(start, end):
            if n_m is not None and (j - start) % n_m[1] == 0:
                local = torch.zeros_like(work)
                for c in range(j, j + n_m[1]):
                    local[:, c] = work[:, c] ** 2 / inverse_diag[c]
                for r in range(rows):
                    for entry in _lowest_first([(r, c) for c in range(j, j + n_m[1])], local)[: n_m[1] - n_m[0]]:
                        pruned[entry] = True
            inverse = torch.linalg.inv(hessian[j:, j:])
            target = torch.where(pruned[:, j], torch.zeros_like(work[:, j]), work[:, j])
            error = (work[:, j] - target) / inverse[0, 0]
            work[:, j:] -= error.unsqueeze(1) * inverse[0].unsqueeze(0)
            work[:, j] = target
    return work, ~pruned


def _case(rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    inputs = torch.randn(4 * cols, cols, generator=generator, dtype=torch.float64)
    return weight, inputs.T @ inputs


def test_default_is_the_original_sparsegpt():
    """Default settings (per_matrix ranking, 128-column blocks, 1% damping) against the slow original: the same
    mask, weights to 1e-5 relative error, exactly round(numel · s) pruned, on a width that 128 does not divide."""
    weight, gram = _case(10, 150, seed=7)
    expected_weight, expected_mask = reference_sparsegpt(weight, gram, 0.6, 128, "per_matrix", None)
    pruned = weight.clone()
    mask = sparsegpt_prune_(pruned, gram, 0.6)
    assert torch.equal(mask, expected_mask)
    assert float((pruned - expected_weight).norm() / expected_weight.norm()) < 1e-5
    assert int((~mask).sum()) == round(10 * 150 * 0.6)
    assert PruningConfig(method="sparsegpt").comparison == "per_matrix"
    assert PruningConfig(method="wanda").comparison == "per_row"


@pytest.mark.parametrize("comparison", ["per_row", "per_matrix"])
@pytest.mark.parametrize(("rows", "cols", "block_size", "sparsity"), [(5, 13, 4, 0.5), (3, 7, 3, 0.3), (1, 9, 8, 0.7)])
def test_exact_counts_sum_over_column_blocks(comparison, rows, cols, block_size, sparsity):
    """Column blocks narrower than the width, widths not divisible: the blocks' counts add up to round(numel · s);
    per_row: every row's count differs from the others' by at most one."""
    weight, gram = _case(rows, cols, seed=rows + cols)
    expected_weight, expected_mask = reference_sparsegpt(weight, gram, sparsity, block_size, comparison, None)
    mask = sparsegpt_prune_(weight.clone(), gram, sparsity, comparison=comparison, block_size=block_size)
    assert torch.equal(mask, expected_mask)
    assert int((~mask).sum()) == round(rows * cols * sparsity)
    if comparison == "per_row":
        per_row = (~mask).sum(dim=1)
        assert int(per_row.max() - per_row.min()) <= 1


@pytest.mark.parametrize(
    ("comparison", "n_m", "block_size"), [("per_row", None, 8), ("per_matrix", None, 5), ("per_row", (2, 4), 8)]
)
def test_matches_slow_obs_reference(comparison, n_m, block_size):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 16, generator=generator, dtype=torch.float64)
    inputs = torch.randn(64, 16, generator=generator, dtype=torch.float64)
    gram = inputs.T @ inputs
    expected_weight, expected_mask = reference_sparsegpt(weight, gram, 0.5, block_size, comparison, n_m)
    pruned = weight.clone()
    mask = sparsegpt_prune_(pruned, gram, 0.5, comparison=comparison, n_m=n_m, block_size=block_size)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(pruned, expected_weight.to(pruned.dtype), atol=1e-4, rtol=1e-4)
    assert torch.all(pruned[~mask] == 0)


def test_reduces_reconstruction_error_against_plain_masking():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 64, generator=generator)
    inputs = torch.randn(512, 64, generator=generator) @ torch.randn(64, 64, generator=generator)  # correlated
    pruned = weight.clone()
    mask = sparsegpt_prune_(pruned, inputs.T @ inputs, 0.5, comparison="per_row", block_size=16)
    obs_error = (inputs @ (weight - pruned).T).square().sum()
    plain_error = (inputs @ (weight * ~mask).T).square().sum()
    assert obs_error < 0.8 * plain_error


def test_dead_inputs_are_zeroed_and_cholesky_survives():
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    inputs = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    inputs[:, 3] = 0.0
    pruned = weight.clone()
    mask = sparsegpt_prune_(pruned, inputs.T @ inputs, 0.25)
    assert torch.all(pruned[:, 3] == 0)
    assert int((~mask).sum()) == 4 * 2


def test_a_caller_s_autocast_leaves_the_updates_in_fp32():
    """``prune()`` called under ``torch.autocast`` (a notebook's mixed-precision cell): the weight updates'
    ``errors @ factor`` ran in bf16, moving the kept weights by up to 0.7 from their fp32 values, where the
    statistics and the algorithm are documented as fp32."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 300, generator=generator)
    inputs = torch.randn(512, 300, generator=generator)
    gram = inputs.T @ inputs
    expected = weight.clone()
    expected_mask = sparsegpt_prune_(expected, gram, 0.5)
    pruned = weight.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask = sparsegpt_prune_(pruned, gram, 0.5)
    assert torch.equal(mask, expected_mask)
    assert torch.equal(pruned, expected)
