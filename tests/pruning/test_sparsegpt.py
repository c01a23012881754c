"""SparseGPT against a slow optimal-brain-surgeon reference that re-inverts the Hessian at every column."""

import pytest
import torch

from ecoflap_pl.pruning.masks import matrix_mask, nm_mask, row_mask
from ecoflap_pl.pruning.sparsegpt import sparsegpt_prune_


def reference_sparsegpt(weight, hessian, sparsity, block_size, comparison, n_m):
    """Column j is removed with OBS using inv(H[j:, j:]) (the Hessian of the columns still free)."""
    work = weight.clone().double()
    hessian = hessian.clone().double()
    hessian += 0.01 * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=torch.float64)
    cols = work.shape[1]
    pruned = torch.zeros_like(work, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        metric = torch.stack(
            [work[:, j] ** 2 / torch.linalg.inv(hessian[j:, j:])[0, 0] for j in range(start, end)], dim=1
        )
        if n_m is None:
            keep = row_mask(metric, sparsity) if comparison == "per_row" else matrix_mask(metric, sparsity)
            pruned[:, start:end] = ~keep
        for j in range(start, end):
            if n_m is not None and (j - start) % n_m[1] == 0:
                span = slice(j, j + n_m[1])
                local = torch.stack(
                    [work[:, c] ** 2 / torch.linalg.inv(hessian[c:, c:])[0, 0] for c in range(j, j + n_m[1])], dim=1
                )
                pruned[:, span] = ~nm_mask(local, *n_m)
            inverse = torch.linalg.inv(hessian[j:, j:])
            target = torch.where(pruned[:, j], torch.zeros_like(work[:, j]), work[:, j])
            error = (work[:, j] - target) / inverse[0, 0]
            work[:, j:] -= error.unsqueeze(1) * inverse[0].unsqueeze(0)
            work[:, j] = target
    return work, ~pruned


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
    mask = sparsegpt_prune_(pruned, inputs.T @ inputs, 0.5, block_size=16)
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
