"""TokenPerplexity against torchmetrics' Perplexity and a plain loop; repeated ids counted once; exact through a bf16
cast of the module; errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchmetrics.text import Perplexity

from ecoflap_pl.metrics import TokenPerplexity, token_perplexity

NUM_SAMPLES, SEQ_LEN, VOCAB = 7, 11, 50


def _lm_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[7, 11, 50]`` and labels with padding (-100) at the ends of rows of unequal length; sample 0 has a
    lower loss per token than the others, so counting its tokens again lowers the perplexity."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=gen)
    labels = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=gen)
    for row, length in enumerate((11, 4, 9, 11, 1, 7, 10)):
        labels[row, length:] = -100
    logits[0].scatter_(1, labels[0].clamp(min=0).unsqueeze(1), 10.0)
    return logits, labels


def _loop_perplexity(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """exp of the mean -log p(label) over every non-ignored token, token by token in float64."""
    nll = [
        -float(logits[i, t].double().log_softmax(dim=-1)[labels[i, t]])
        for i in range(labels.shape[0])
        for t in range(labels.shape[1])
        if labels[i, t] != -100
    ]
    return math.exp(math.fsum(nll) / len(nll))


def test_equals_torchmetrics_perplexity_and_a_loop_without_repeats() -> None:
    logits, labels = _lm_data()
    metric, reference = TokenPerplexity(), Perplexity(ignore_index=-100)
    for start in range(0, NUM_SAMPLES, 3):  # batches of unequal size: 3, 3, 1
        part = slice(start, start + 3)
        metric.update(logits[part], labels[part], ids=list(range(NUM_SAMPLES))[part])
        reference.update(logits[part], labels[part])
    result = metric.compute()
    assert result.dtype == torch.float64 and result.ndim == 0
    assert float(result) == pytest.approx(float(reference.compute()), rel=1e-6)
    assert float(result) == pytest.approx(_loop_perplexity(logits, labels), rel=1e-6)
    assert float(token_perplexity(logits, labels)) == float(result)


def test_the_tokens_of_a_repeated_id_count_once_and_without_ids_every_sample_counts() -> None:
    logits, labels = _lm_data()
    # a padding DistributedSampler repeats the first sample at the end
    again = [*range(NUM_SAMPLES), 0]
    metric = TokenPerplexity()
    metric.update(logits[:4], labels[:4], ids=[f"doc-{i}" for i in again[:4]])
    metric.update(logits[again[4:]], labels[again[4:]], ids=[f"doc-{i}" for i in again[4:]])
    once = float(token_perplexity(logits, labels))
    assert float(metric.compute()) == pytest.approx(once, rel=1e-12)
    assert float(token_perplexity(logits[again], labels[again], ids=again)) == pytest.approx(once, rel=1e-12)
    # without ids (or with None ids) the repeat counts again: torchmetrics' sums
    reference = Perplexity(ignore_index=-100)
    reference.update(logits[again], labels[again])
    counted_twice = float(token_perplexity(logits[again], labels[again]))
    assert counted_twice == pytest.approx(float(reference.compute()), rel=1e-6)
    assert counted_twice < once * 0.9
    assert float(token_perplexity(logits[again], labels[again], ids=[*range(NUM_SAMPLES), None])) == counted_twice


def test_ignore_index_is_the_metrics_own() -> None:
    logits, labels = _lm_data()
    padded = labels.masked_fill(labels == -100, 0)  # padding at token 0, as a tokenizer's pad id
    metric = TokenPerplexity(ignore_index=0)
    metric.update(logits, padded)
    expected = float(Perplexity(ignore_index=0)(logits, padded))
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-6)
    assert float(token_perplexity(logits, padded, ignore_index=0)) == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(float(token_perplexity(logits, padded)), rel=1e-3)


def test_stays_exact_through_a_bfloat16_cast_of_the_lightning_module() -> None:
    # "bf16-true" precision calls module.to(torch.bfloat16), which converts every floating-point metric state; sums of
    # fp32 log-likelihoods have no bf16 form, so a float state would show it
    logits, labels = _lm_data()
    cast, plain = TokenPerplexity(), TokenPerplexity()
    nn.ModuleDict({"perplexity": cast}).to(torch.bfloat16)
    for metric in (cast, plain):
        metric.update(logits[:4], labels[:4], ids=range(4))
        metric.update(logits[:1], labels[:1], ids=[0])
    nn.ModuleDict({"perplexity": cast}).to(torch.bfloat16)
    assert cast.loss_bits[0].dtype == cast.token_counts[0].dtype == torch.int64
    assert float(cast.compute()) == float(plain.compute()) == float(token_perplexity(logits[:4], labels[:4]))


@pytest.mark.parametrize(
    ("logits", "labels"),
    [
        (torch.zeros(2, VOCAB), torch.zeros(2, dtype=torch.long)),  # one position per sample, not [N, T, V]
        (torch.zeros(2, 5, VOCAB), torch.zeros(2, 4, dtype=torch.long)),  # causal logits and labels not shifted alike
        (torch.zeros(2, 5, VOCAB), torch.zeros(2, 5)),  # float labels
    ],
)
def test_update_refuses_logits_and_labels_that_do_not_pair_up(logits: torch.Tensor, labels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"`logits` must be \[num_samples, seq_len, vocab_size\] and `labels` integer"):
        TokenPerplexity().update(logits, labels)


@pytest.mark.parametrize("ignore_index", [None, -100.0, True])
def test_ignore_index_must_be_an_int(ignore_index: object) -> None:
    with pytest.raises(ValueError, match=r"`ignore_index` must be an int, got"):
        TokenPerplexity(ignore_index=ignore_index)  # type: ignore[arg-type]


def test_ids_must_name_each_sample() -> None:
    with pytest.raises(ValueError, match=r"`ids` must have one id per sample \(2\), got 1"):
        TokenPerplexity().update(torch.zeros(2, 3, VOCAB), torch.zeros(2, 3, dtype=torch.long), ids=[7])


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_compute_without_samples_or_target_tokens_raises() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        TokenPerplexity().compute()
    metric = TokenPerplexity()
    metric.update(torch.zeros(0, 3, VOCAB), torch.zeros(0, 3, dtype=torch.long), ids=[])
    with pytest.raises(ValueError, match="at least one sample"):
        metric.compute()
    # samples whose every label is ignored (a one-token document after the causal shift): not a NaN perplexity
    metric.update(torch.zeros(2, 1, VOCAB), torch.full((2, 1), -100), ids=[0, 1])
    with pytest.raises(ValueError, match=r"at least one target token, got none: every label is the ignore_index"):
        metric.compute()
