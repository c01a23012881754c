"""Two CPU ranks (gloo) prune like one process that sees every calibration batch."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from ecoflap_pl import PruningConfig, prune
from tests.distributed import gloo_group, spawn_ranks
from tests.pruning.pruning_helpers import seeded_toy_model, toy_batches, toy_loss

CONFIGS = {
    "zeroth_order_wanda": PruningConfig(sparsity=0.5, coarse_samples=16, fine_samples=16),
    "first_order_sparsegpt": PruningConfig(
        sparsity=0.5, importance="first_order", method="sparsegpt", coarse_samples=16, fine_samples=16
    ),
    # Norms per batch, summed over batches: the raw sums stay linear in the batches, so they all-reduce.
    "gradient_norm_per_block": PruningConfig(
        sparsity=0.5, importance="gradient_norm", probe_granularity="per_block", coarse_samples=16, fine_samples=16
    ),
    # Every block checkpointed: each rank runs its blocks again in its own backward passes.
    "gradient_norm_recomputed": PruningConfig(
        sparsity=0.5, importance="gradient_norm", activation_storage="recompute", coarse_samples=16, fine_samples=16
    ),
    # 2 batches score, 2 prune, the last 2 are held out (one per rank, their losses all-reduced).
    "auto": PruningConfig(
        sparsity=0.6, allocation="auto", coarse_samples=8, fine_samples=8, auto_holdout_samples=8, owl_m=2.0
    ),
}


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def _rank_main(rank: int, world_size: int, port: int, results: dict) -> None:
    with gloo_group(rank, world_size, port):
        for name, config in CONFIGS.items():
            result = prune(
                seeded_toy_model(), toy_batches(4), toy_loss, config, all_reduce=_all_reduce, rank=rank, world_size=2
            )
            heldout = [(c.name, c.heldout_loss) for c in result.candidates]
            results[(rank, name)] = (result.group_scores, result.group_sparsity, result.masks, heldout)


@pytest.mark.distributed
def test_two_ranks_build_the_masks_of_one_process():
    results = spawn_ranks(_rank_main)
    for name, config in CONFIGS.items():
        single = prune(seeded_toy_model(), toy_batches(4), toy_loss, config)
        for rank in (0, 1):
            scores, sparsity, masks, heldout = results[(rank, name)]
            assert scores == pytest.approx(single.group_scores, rel=1e-6)
            assert [n for n, _ in heldout] == [c.name for c in single.candidates]
            assert [loss for _, loss in heldout] == pytest.approx([c.heldout_loss for c in single.candidates], rel=1e-6)
            assert sparsity == single.group_sparsity
            assert masks.keys() == single.masks.keys()
            for key, mask in masks.items():
                assert torch.equal(mask, single.masks[key]), (name, rank, key)


def _short_set_rank_main(rank: int, world_size: int, port: int, errors: dict) -> None:
    # A rank stuck in a collective fails after the timeout instead of hanging the test.
    with gloo_group(rank, world_size, port, timeout=timedelta(seconds=60)):
        config = PruningConfig(sparsity=0.5, coarse_samples=16, fine_samples=16)
        try:
            # One calibration batch for two ranks: rank 1 would get none of either step.
            prune(seeded_toy_model(), toy_batches(1), toy_loss, config, all_reduce=_all_reduce, rank=rank, world_size=2)
        except ValueError as error:
            errors[rank] = str(error)
        dist.barrier()  # both ranks got here: neither is left waiting in an all-reduce of the other


@pytest.mark.distributed
def test_short_calibration_set_is_refused_identically_on_every_rank():
    errors = spawn_ranks(_short_set_rank_main)
    assert errors.keys() == {0, 1}
    assert errors[0] == errors[1]
    assert "Each of the 2 ranks needs at least one calibration batch" in errors[0] and "HINT:" in errors[0]


def _counting_loss(calls: dict[str, int]) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """``toy_loss`` that counts its calls and the backward passes through it in ``calls``."""

    def counted_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls["loss"] += 1
        loss = toy_loss(model, batch)
        if loss.requires_grad:
            loss.register_hook(lambda grad: calls.__setitem__("backward", calls["backward"] + 1))
        return loss

    return counted_loss


def _counted_rank_main(rank: int, world_size: int, port: int, results: dict) -> None:
    with gloo_group(rank, world_size, port):
        for name, config in CONFIGS.items():
            calls = {"loss": 0, "backward": 0}
            loss_fn = _counting_loss(calls)
            result = prune(
                seeded_toy_model(), toy_batches(4), loss_fn, config, all_reduce=_all_reduce, rank=rank, world_size=2
            )
            results[(rank, name)] = (dict(calls), {stage: stats.to_dict() for stage, stats in result.stages.items()})


@pytest.mark.distributed
def test_the_stage_costs_of_two_ranks_count_the_work_of_both():
    """Each rank counted only its own share of the forwards and backwards, while `samples` covered both: the
    report of a 2-process run said 20 coarse forwards where the ranks ran 40 (CASES 235)."""
    results = spawn_ranks(_counted_rank_main)
    for name in CONFIGS:
        (calls_0, stages_0), (calls_1, stages_1) = results[(0, name)], results[(1, name)]
        assert stages_0 == stages_1, name  # every rank reports the whole run
        assert sum(stats["full_forwards"] for stats in stages_0.values()) == calls_0["loss"] + calls_1["loss"], name
        backwards = sum(stats["backward_passes"] for stats in stages_0.values())
        assert backwards == calls_0["backward"] + calls_1["backward"], name
        assert all(stats["seconds"] > 0 and stats["peak_memory_bytes"] > 0 for stats in stages_0.values()), name
    assert results[(0, "first_order_sparsegpt")][1]["coarse"]["backward_passes"] == 4  # one per batch, on both ranks
