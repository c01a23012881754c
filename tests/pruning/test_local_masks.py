"""Local pruners against slow, obviously-correct loops."""

import pytest
import torch

from ecoflap_pl.pruning.masks import (
    matrix_mask,
    nm_mask,
    pruned_count,
    row_counts,
    row_mask,
    select_mask,
    wanda_scores,
)
from tests.pruning.pruning_helpers import slow_row_mask


def slow_nm_mask(scores, n, m):
    mask = torch.ones_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for start in range(0, scores.shape[1], m):
            ranked = sorted(range(start, start + m), key=lambda c: (float(scores[r, c]), c))
            for c in ranked[: m - n]:
                mask[r, c] = False
    return mask


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_wanda_per_row_matches_reference_with_exact_counts(sparsity):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(12, 40, generator=generator)
    inputs = torch.randn(3, 7, 40, generator=generator)
    column_sq_sums = inputs.reshape(-1, 40).square().sum(0)
    scores = wanda_scores(weight, column_sq_sums)
    reference = torch.tensor([[abs(weight[i, j]) * column_sq_sums[j].sqrt() for j in range(40)] for i in range(12)])
    torch.testing.assert_close(scores, reference)
    mask = row_mask(scores, sparsity)
    assert torch.equal(mask, slow_row_mask(scores, sparsity))
    pruned_per_row = mask.logical_not().sum(dim=1)
    assert int(pruned_per_row.sum()) == round(12 * 40 * sparsity)
    assert int(pruned_per_row.max() - pruned_per_row.min()) <= 1


def test_ties_never_prune_more_than_asked():
    scores = torch.zeros(4, 10)  # all tied: a threshold with <= would prune everything
    mask = row_mask(scores, 0.5)
    assert (mask.logical_not().sum(dim=1) == 5).all()
    assert (matrix_mask(scores, 0.35).logical_not().sum() == 14).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_ties_are_broken_by_position_like_a_stable_sort(sparsity):
    """Many ties, and NaN (ranked highest): the masks are exactly the slow, stable reference's."""
    scores = torch.randint(0, 4, (9, 20), generator=torch.Generator().manual_seed(5)).float()
    scores[0, :3] = float("nan")
    scores[1] = float("nan")
    assert torch.equal(row_mask(scores, sparsity), slow_row_mask(scores, sparsity))
    order = sorted(range(scores.numel()), key=lambda i: (float(scores.flatten()[i].nan_to_num(nan=float("inf"))), i))
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[order[: round(scores.numel() * sparsity)]] = False
    assert torch.equal(matrix_mask(scores, sparsity), expected.view_as(scores))


def test_matrix_mask_exact_count():
    scores = torch.randn(10, 13, generator=torch.Generator().manual_seed(2))
    mask = matrix_mask(scores, 0.6)
    assert int((~mask).sum()) == round(130 * 0.6)
    assert scores[~mask].max() <= scores[mask].min()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_matches_reference(n, m):
    scores = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)).round(decimals=1)  # with ties
    mask = nm_mask(scores, n, m)
    assert torch.equal(mask, slow_nm_mask(scores, n, m))
    assert (mask.reshape(6, -1, m).sum(dim=2) == n).all()


def test_nm_mask_rejects_bad_width():
    with pytest.raises(ValueError, match=r"multiple of M=4, got a \[2, 6\] weight"):
        nm_mask(torch.randn(2, 6), 2, 4)


def test_select_mask_dispatch():
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(select_mask(scores, 0.5, "per_row", None), row_mask(scores, 0.5))
    assert torch.equal(select_mask(scores, 0.5, "per_matrix", None), matrix_mask(scores, 0.5))
    assert torch.equal(select_mask(scores, 0.5, "per_row", (2, 4)), nm_mask(scores, 2, 4))


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (1, 7), (7, 1), (3, 5), (5, 3), (13, 17), (2, 129)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99])
def test_exact_counts_on_odd_shapes(rows, cols, sparsity):
    """Every tensor loses round(numel · s), whatever its shape; per-row counts differ by at most one."""
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows * 100 + cols))
    expected = round(rows * cols * sparsity)
    assert pruned_count(rows * cols, sparsity) == expected
    mask = row_mask(scores, sparsity)
    per_row = mask.logical_not().sum(dim=1)
    assert int(per_row.sum()) == expected
    assert int(per_row.max() - per_row.min()) <= 1
    assert torch.equal(mask, slow_row_mask(scores, sparsity))
    assert int(matrix_mask(scores, sparsity).logical_not().sum()) == expected


def test_extra_weights_go_to_the_rows_where_they_cost_least():
    """3 rows x 4 cols at 0.5 -> 6 pruned = 2 per row, no extra; at 7/12 -> 7 = 2 per row + 1 extra, to the row
    whose third-lowest score is smallest (row 2 here), never simply to the first row."""
    scores = torch.tensor([[1.0, 2.0, 9.0, 9.0], [1.0, 2.0, 8.0, 9.0], [1.0, 2.0, 3.0, 9.0]])
    counts = row_counts(scores, 7)
    assert counts.tolist() == [2, 2, 3]
    assert row_mask(scores, 7 / 12).logical_not().sum(dim=1).tolist() == [2, 2, 3]
    assert row_counts(torch.zeros(3, 4), 8).tolist() == [3, 3, 2]  # all tied: the first rows


def test_row_counts_rejects_impossible_totals():
    with pytest.raises(ValueError, match=r"`total` must be in \[0, 6\]"):
        row_counts(torch.zeros(2, 3), 7)
