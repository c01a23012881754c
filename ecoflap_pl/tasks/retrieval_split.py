"""The whole retrieval evaluation split as every rank sees it after gathering each rank's embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ecoflap_pl.metrics._states import first_occurrences
from ecoflap_pl.tasks.distributed import gather_objects, gather_tensors, pad_cat, rank_and_world_size


@dataclass
class Split:
    """The whole evaluation split, each image once, as every rank sees it after the gather."""

    image_embeds: Tensor
    text_embeds: Tensor
    text_to_image: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    owner: Tensor  # (num_images,) rank holding each image's vision output
    local_index: Tensor  # (num_images,) row of that image in its owner's `hidden`
    hidden: Tensor | None  # this rank's vision outputs
    rank: int
    world_size: int


def gather_split(parts: list[dict[str, Any]], with_hidden: bool) -> Split:
    """The whole split from this rank's evaluation ``parts`` and every other rank's, each image once.

    Args:
        parts: per batch, ``image_embeds``, ``captions_per_image``, ``text_embeds``, ``input_ids``,
            ``attention_mask``, ``image_id`` and ``hidden`` (the vision outputs, kept on this rank).
        with_hidden: keep this rank's vision outputs for ITM re-ranking.
    """
    rank, world_size = rank_and_world_size()
    local = {
        "image_embeds": torch.cat([p["image_embeds"] for p in parts]).float(),
        "captions_per_image": torch.cat([p["captions_per_image"] for p in parts]),
        "text_embeds": torch.cat([p["text_embeds"] for p in parts]).float(),
        "input_ids": pad_cat([p["input_ids"] for p in parts]),
        "attention_mask": pad_cat([p["attention_mask"] for p in parts]),
    }
    ids = [image_id for p in parts for image_id in p["image_id"]]
    gathered = {name: gather_tensors(value) for name, value in local.items()}
    all_ids = gather_objects(ids)
    counts = [len(rank_ids) for rank_ids in all_ids]
    flat_ids = [image_id for rank_ids in all_ids for image_id in rank_ids]
    device = local["image_embeds"].device
    keep = torch.tensor(first_occurrences(flat_ids), dtype=torch.bool, device=device)
    owner = torch.repeat_interleave(torch.arange(world_size, device=device), torch.tensor(counts, device=device))
    local_index = torch.cat([torch.arange(n, device=device) for n in counts])
    captions = torch.cat(gathered["captions_per_image"])
    text_keep = torch.repeat_interleave(keep, captions)
    captions = captions[keep]
    return Split(
        image_embeds=torch.cat(gathered["image_embeds"])[keep],
        text_embeds=torch.cat(gathered["text_embeds"])[text_keep],
        text_to_image=torch.repeat_interleave(torch.arange(len(captions), device=device), captions),
        input_ids=pad_cat(gathered["input_ids"])[text_keep],
        attention_mask=pad_cat(gathered["attention_mask"])[text_keep],
        owner=owner[keep],
        local_index=local_index[keep],
        hidden=torch.cat([p["hidden"] for p in parts]) if with_hidden else None,
        rank=rank,
        world_size=world_size,
    )
