"""Tiny evaluation data shared by the metric tests and the DDP workers they spawn."""

from __future__ import annotations

import torch

# Six images; a reference holds a "\r" (PTBTokenizer would split it into two lines and shift every later caption:
# CaptionScores turns any line break into a space), a prediction is empty (a collapsed model), one is not ASCII.
CAPTION_IDS = [391895, 522418, 184613, 318219, 554625, 397133]
CAPTION_REFERENCES = [
    [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "a person on a surf board in the water",
    ],
    ["Two dogs play with a frisbee in the park.", "two dogs running on the grass", "Dogs chasing a flying disc."],
    ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a white plate."],
    [
        "A red double-decker bus on a city street.",
        "A bus driving down the road.",
        "a big red\rbus",
        "The double decker bus is parked.",
    ],
    ["A cat sleeping on a laptop keyboard.", "cat lying on a computer"],
    ["A kitchen with wooden cabinets and a stove.", "An empty kitchen.", "kitchen with a stove, sink and cabinets"],
]
CAPTION_PREDICTIONS = [
    "a man riding a wave on a surfboard",
    "Two dogs playing with a frisbee!",
    "",
    "a red bus driving down a street",
    "a cat sleeping on a laptop in a café",
    "a kitchen with a stove and a sink",
]

# VQA: (prediction, 10 human answers, answer type); the expected scores are worked out in test_vqa.py.
VQA_QUESTIONS = [
    ("yes", ["yes"] * 10, "yes/no"),
    ("No", ["no"] * 2 + ["yes"] * 8, "yes/no"),
    ("two", ["2"] * 3 + ["3"] * 7, "number"),
    ("the dog", ["dog"] * 10, "other"),
    ("t-shirt", ["t shirt"] * 1 + ["shirt"] * 9, "other"),
    ("dont know", ["don't know"] * 5 + ["no"] * 5, "other"),
]
VQA_EXPECTED = {
    "accuracy": (1.0 + 0.6 + 0.9 + 1.0 + 0.3 + 1.0) / 6,
    "accuracy_yes_no": (1.0 + 0.6) / 2,
    "accuracy_number": 0.9,
    "accuracy_other": (1.0 + 0.3 + 1.0) / 3,
}


def retrieval_data(seed: int = 0, num_images: int = 6, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image embeddings ``[num_images, dim]``, text embeddings and their image index (1 to 4 captions per image)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=gen), dim=1)
    counts = torch.randint(1, 5, (num_images,), generator=gen)
    text_to_image = torch.repeat_interleave(torch.arange(num_images), counts)
    noise = 0.8 * torch.randn(len(text_to_image), dim, generator=gen)
    texts = torch.nn.functional.normalize(images[text_to_image] + noise, dim=1)
    return images, texts, text_to_image


def recall_from_ranks(t2i_ranks: list[int], i2t_ranks: list[int], top_k: tuple[int, ...]) -> dict[str, float]:
    """The recall dict of :func:`~ecoflap_pl.metrics.retrieval_recall` from each query's rank (0 = first), by loops."""
    out = {}
    for name, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        for k in top_k:
            out[f"{name}_r{k}"] = sum(rank < k for rank in ranks) / len(ranks)
        out[f"{name}_r_mean"] = sum(out[f"{name}_r{k}"] for k in top_k) / len(top_k)
    out["r_mean"] = (out["t2i_r_mean"] + out["i2t_r_mean"]) / 2
    return out
