"""Tiny seeded models, calibration batches and losses for the engine tests.

A plain module (not ``conftest``), imported by its full name: ``from tests.pruning.pruning_helpers import ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ecoflap_pl.models.tokenizers import IMAGE_ID
from ecoflap_pl.pruning.calls import hidden_output

VOCAB = 128
FIRST_WORD_ID = 8  # ids below are special tokens (ecoflap_pl.models.tokenizers.SPECIAL_TOKENS)


class ToyBlock(nn.Module):
    """A pre-norm MLP block: enough structure for stacks, hooks and propagation."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, hidden: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return hidden + scale * self.fc2(torch.relu(self.fc1(self.norm(hidden))))


class ToyModel(nn.Module):
    """Embedding -> a stack of ToyBlocks -> head; the loss is cross-entropy of the head's logits."""

    def __init__(self, width: int = 16, depth: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.layers = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        for layer in self.layers:
            hidden = layer(hidden, scale=0.5)
        return self.head(hidden).mean(dim=1)


class OpaqueWeight(ToyModel):
    """Uses block 0's fc1 weight through a matmul, which the F.linear interception cannot see (the fast
    zeroth-order path falls back to one forward per probe)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        hidden = hidden + 0.1 * (hidden @ self.layers[0].fc1.weight.T)[..., : hidden.shape[-1]]
        for layer in self.layers:
            hidden = layer(hidden, scale=0.5)
        return self.head(hidden).mean(dim=1)


ToyLinearInputs = tuple[tuple[str, nn.Linear, list[torch.Tensor]], ...]


def toy_linear_inputs(model: ToyModel, batches: list[dict[str, torch.Tensor]]) -> Iterator[tuple[int, ToyLinearInputs]]:
    """The slow references' written-out forward of ``model`` on ``batches``, block by block: yields the block's index
    and ``(name, linear, inputs)`` of its fc1 and fc2, both measured before the caller's loop body runs; only then
    does the block's own forward carry the hidden states on, so that a caller that prunes the block feeds its pruned
    outputs to the next one."""
    hidden = [model.embed(batch["inputs"]) for batch in batches]
    for index, block in enumerate(model.layers):
        fc1_inputs = [block.norm(h) for h in hidden]
        fc2_inputs = [torch.relu(block.fc1(x)) for x in fc1_inputs]
        yield index, (("fc1", block.fc1, fc1_inputs), ("fc2", block.fc2, fc2_inputs))
        hidden = [block(h, scale=0.5) for h in hidden]


def toy_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["inputs"]), batch["labels"])


def toy_batches(count: int = 4, size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "inputs": torch.randn(size, 6, 8, generator=generator),
            "labels": torch.randint(0, 5, (size,), generator=generator),
        }
        for _ in range(count)
    ]


def seeded_toy_model(seed: int = 0, **kwargs: Any) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel(**kwargs).eval()


def _rank_key(value: Any) -> float:
    return float("inf") if value != value else float(value)  # NaN ranks highest


def slow_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Exactly round(numel · sparsity) pruned; every row loses total // rows, and the remaining ones go to the rows
    whose next-lowest score is smallest (ties to the first row); inside a row, a stable sort."""
    rows, cols = scores.shape
    total = round(rows * cols * sparsity)
    base, extra = divmod(total, rows)
    ranked = [sorted(range(cols), key=lambda c, r=r: (_rank_key(scores[r, c]), c)) for r in range(rows)]
    counts = [base] * rows
    if extra:
        by_next = sorted(range(rows), key=lambda r: (_rank_key(scores[r, ranked[r][base]]), r))
        for r in by_next[:extra]:
            counts[r] += 1
    mask = torch.ones_like(scores, dtype=torch.bool)
    for r in range(rows):
        for c in ranked[r][: counts[r]]:
            mask[r, c] = False
    return mask


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


# --- tiny Hugging Face / timm families ------------------------------------------------------------------------------

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def _words(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    return torch.randint(FIRST_WORD_ID, VOCAB, (batch, length), generator=generator)


def _images(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, 3, 32, 32, generator=generator)


def _blip2_opt_batch(generator: torch.Generator, size: int) -> Batch:
    # transformers 5.x scatters the Q-Former outputs into the <image> placeholders (num_query_tokens = 4).
    input_ids = _words(generator, size, 10)
    input_ids[:, :4] = IMAGE_ID
    labels = input_ids.masked_fill(input_ids == IMAGE_ID, -100)
    return {"pixel_values": _images(generator, size), "input_ids": input_ids, "labels": labels}


def _blip2_t5_batch(generator: torch.Generator, size: int) -> Batch:
    input_ids = _words(generator, size, 8)
    input_ids[:, :4] = IMAGE_ID
    return {"pixel_values": _images(generator, size), "input_ids": input_ids, "labels": _words(generator, size, 6)}


def _timm_batch(generator: torch.Generator, size: int) -> Batch:
    return {"pixel_values": _images(generator, size), "labels": torch.randint(0, 10, (size,), generator=generator)}


def _hf_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch).loss


def _lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"]).loss


def _clip_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch, return_loss=True).loss


def _timm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch["pixel_values"]), batch["labels"])


FAMILIES: dict[str, tuple[Callable[[torch.Generator, int], Batch], LossFn]] = {
    "blip2_opt": (_blip2_opt_batch, _hf_loss),
    "blip2_t5": (_blip2_t5_batch, _hf_loss),
    "blip": (lambda g, n: {"pixel_values": _images(g, n), "input_ids": _words(g, n, 8)}, _lm_loss),
    "clip": (lambda g, n: {"pixel_values": _images(g, n), "input_ids": _words(g, n, 8)}, _clip_loss),
    "vilt": (
        lambda g, n: {
            "pixel_values": _images(g, n, 2),
            "input_ids": _words(g, n, 8),
            "labels": torch.randint(0, 2, (n,), generator=g),
        },
        _hf_loss,
    ),
    "t5": (lambda g, n: {"input_ids": _words(g, n, 8), "labels": _words(g, n, 6)}, _hf_loss),
    "llama": (lambda g, n: {"input_ids": _words(g, n, 8)}, _lm_loss),
    "vit": (_timm_batch, _timm_loss),
    "eva": (_timm_batch, _timm_loss),
}
"""Family -> (batch builder, calibration loss). Every model is the tiny one of ``ecoflap_pl.models.tiny``."""


def family_case(
    family: str, batches: int = 2, size: int = 2, seed: int = 0, **model_kwargs: Any
) -> tuple[nn.Module, list[Batch], LossFn]:
    """A tiny seeded model of ``family`` (``model_kwargs`` go to ``tiny_model``/``tiny_timm``), ``batches``
    calibration batches of ``size`` samples, and its calibration loss."""
    from ecoflap_pl.models.tiny import tiny_model, tiny_timm  # transformers and timm: only for the tests using them

    make_batch, loss_fn = FAMILIES[family]
    build = tiny_timm if family in ("vit", "eva") else tiny_model
    model = build(family, seed=seed, **model_kwargs)
    generator = torch.Generator().manual_seed(seed)
    return model, [make_batch(generator, size) for _ in range(batches)], loss_fn


def own_block_outputs(model, blocks, batches, loss_fn):
    """outputs[block][call]: the hidden stream every block returns during the model's own forward passes."""
    outputs = [[] for _ in blocks]
    handles = [
        block.register_forward_hook(lambda module, args, output, i=i: outputs[i].append(hidden_output(output)))
        for i, block in enumerate(blocks)
    ]
    try:
        for batch in batches:
            loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return outputs
