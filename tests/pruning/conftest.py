"""Tiny seeded models and data for the engine tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


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


@pytest.fixture
def toy_model() -> ToyModel:
    torch.manual_seed(0)
    return ToyModel().eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
