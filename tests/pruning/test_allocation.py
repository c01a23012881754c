import math
import random

import pytest

from ecoflap_pl import allocate_sparsity


def kept(allocation, sizes):
    return sum(round((1 - allocation[g]) * sizes[g]) for g in sizes)


def random_case(rng):
    groups = [f"g{i}" for i in range(rng.randint(1, 12))]
    sizes = {g: rng.choice([7, 64, 100, 1000, 4096, rng.randint(1, 5000)]) for g in groups}
    scores = {g: rng.choice([0.0, rng.random(), rng.random() * 1e3, rng.random() * 1e-6]) for g in groups}
    sparsity = rng.choice([0.0, 0.3, 0.5, 0.6, 0.7, rng.random() * 0.9])
    max_sparsity = min(sparsity + rng.choice([0.0, 0.05, 0.1, 0.3]), 0.99)
    return scores, sizes, sparsity, max_sparsity


@pytest.mark.parametrize("seed", range(200))
def test_budget_cap_and_termination_on_random_inputs(seed):
    scores, sizes, sparsity, max_sparsity = random_case(random.Random(seed))
    allocation = allocate_sparsity(scores, sizes, sparsity, max_sparsity)
    total = sum(sizes.values())
    target = round(total * (1 - sparsity))
    floors = sum(math.ceil(n * (1 - max_sparsity) - 1e-9) for n in sizes.values())
    assert kept(allocation, sizes) == max(target, floors)
    assert floors - target <= len(sizes)  # the floors overshoot by at most one parameter per group
    for group, value in allocation.items():
        assert 0.0 <= value <= max_sparsity + 1e-12, group
        assert abs(value * sizes[group] - round(value * sizes[group])) < 1e-6  # whole parameters


@pytest.mark.parametrize("seed", range(50))
def test_monotone_in_score_for_equal_sizes(seed):
    rng = random.Random(seed)
    groups = [f"g{i}" for i in range(10)]
    sizes = dict.fromkeys(groups, 1000)
    scores = {g: rng.random() for g in groups}
    allocation = allocate_sparsity(scores, sizes, 0.5, 0.6)
    for a in groups:
        for b in groups:
            if scores[a] > scores[b]:
                assert allocation[a] <= allocation[b]


def test_monotone_in_score_density_for_mixed_sizes():
    sizes = {"vision": 1000, "language": 4000, "small": 10}
    scores = {"vision": 2.0, "language": 4.0, "small": 0.001}
    allocation = allocate_sparsity(scores, sizes, 0.5, 0.6)
    by_density = sorted(sizes, key=lambda g: scores[g] / sizes[g])
    values = [allocation[g] for g in by_density]
    assert values == sorted(values, reverse=True)


def test_closed_form_away_from_saturation():
    sizes = {"a": 10_000, "b": 10_000, "c": 20_000}
    scores = {"a": 1.0, "b": 2.0, "c": 3.0}
    p, s_max = 0.5, 0.6
    allocation = allocate_sparsity(scores, sizes, p, s_max)
    n = sum(sizes.values())
    for g in sizes:
        expected = s_max - scores[g] / sum(scores.values()) * (s_max - p) * n / sizes[g]
        assert allocation[g] == pytest.approx(expected, abs=1 / sizes[g])


def test_saturated_group_respreads_its_excess():
    sizes = {"hot": 100, "cold": 10_000}
    allocation = allocate_sparsity({"hot": 1e6, "cold": 1.0}, sizes, 0.5, 0.9)
    assert allocation["hot"] == 0.0  # keeps everything
    assert kept(allocation, sizes) == round(10_100 * 0.5)


def test_all_zero_scores_give_uniform_sparsity():
    sizes = {"a": 1000, "b": 3000, "c": 500}
    allocation = allocate_sparsity(dict.fromkeys(sizes, 0.0), sizes, 0.5, 0.6)
    for value in allocation.values():
        assert value == pytest.approx(0.5, abs=2e-3)
    assert kept(allocation, sizes) == 2250


def test_degenerate_inputs():
    assert allocate_sparsity({"only": 3.0}, {"only": 1000}, 0.5, 0.6) == {"only": 0.5}
    assert allocate_sparsity({"a": 1.0, "b": 0.0}, {"a": 10, "b": 10}, 0.0, 0.0) == {"a": 0.0, "b": 0.0}
    equal_cap = allocate_sparsity({"a": 5.0, "b": 0.0}, {"a": 100, "b": 100}, 0.5, 0.5)
    assert equal_cap == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (({"a": 1.0}, {"a": 10}, 1.0, 1.0), r"`sparsity` must be in \[0, 1\)"),
        (({"a": 1.0}, {"a": 10}, 0.5, 0.4), r"`max_sparsity` must be in \[sparsity, 1\)"),
        (({"a": 1.0}, {"b": 10}, 0.5, 0.6), r"same groups; only in scores: \['a'\]"),
        (({}, {}, 0.5, 0.6), r"`sizes` must name at least one group"),
        (({"a": 1.0}, {"a": 0}, 0.5, 0.6), r"`sizes\['a'\]` must be a positive integer"),
        (({"a": float("nan")}, {"a": 10}, 0.5, 0.6), r"`scores\['a'\]` must be finite and >= 0"),
        (({"a": -1.0}, {"a": 10}, 0.5, 0.6), r"`scores\['a'\]` must be finite and >= 0"),
    ],
)
def test_errors(args, message):
    with pytest.raises(ValueError, match=message):
        allocate_sparsity(*args)
