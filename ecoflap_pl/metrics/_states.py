"""Helpers for metric states that torchmetrics can gather across DDP ranks.

Text is not a tensor, so a batch of strings is stored as two tensors: the UTF-8 bytes of all strings concatenated
(``uint8``) and the byte length of each string (``int64``). Both live in list states with
``dist_reduce_fx="cat"``; torchmetrics gathers every list state rank by rank, so after a sync the i-th string of
every text state still belongs to the i-th sample. Integer dtypes also keep the states intact when Lightning casts
the LightningModule (``module.to(torch.bfloat16)`` converts every floating-point metric state).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors


def encode_texts(texts: Sequence[str], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Encode strings as (concatenated UTF-8 bytes ``uint8 [total]``, byte lengths ``int64 [len(texts)]``)."""
    encoded = [text.encode("utf-8") for text in texts]
    data = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if any(encoded) else None
    flat = data.to(device) if data is not None else torch.zeros(0, dtype=torch.uint8, device=device)
    lengths = torch.tensor([len(chunk) for chunk in encoded], dtype=torch.int64, device=device)
    return flat, lengths


def decode_texts(data: Tensor, lengths: Tensor) -> list[str]:
    """Invert :func:`encode_texts`."""
    raw = data.to(device="cpu", dtype=torch.uint8).numpy().tobytes()
    texts, start = [], 0
    for length in lengths.tolist():
        texts.append(raw[start : start + int(length)].decode("utf-8"))
        start += int(length)
    return texts


def text_state_dtypes(*prefixes: str) -> dict[str, torch.dtype]:
    """The two list states of each text state ``prefix``: ``{prefix}_bytes`` (``uint8``) and ``{prefix}_lengths``."""
    return {key: dtype for p in prefixes for key, dtype in ((f"{p}_bytes", torch.uint8), (f"{p}_lengths", torch.int64))}


def cat_state(state: Tensor | list[Tensor], dtype: torch.dtype) -> Tensor:
    """A list state (before sync) or a tensor (after sync) as one tensor of `dtype`; empty gives an empty tensor."""
    if isinstance(state, list) and not state:
        return torch.zeros(0, dtype=dtype)
    return dim_zero_cat(state).to(dtype)


def first_occurrences(keys: Sequence[Hashable]) -> list[bool]:
    """Keep-mask that drops repeated keys (the padding a ``DistributedSampler`` adds); ``""`` or None: "no key",
    never dropped."""
    seen: set[Hashable] = set()
    keep = []
    for key in keys:
        unkeyed = key is None or key == ""
        keep.append(unkeyed or key not in seen)
        if not unkeyed:
            seen.add(key)
    return keep


def sample_ids(ids: Sequence[int | str | None] | None, size: int, arg: str = "ids") -> list[str]:
    """Ids as strings, validated against the batch size; ``""`` (never dropped) where ``ids`` or one id is None."""
    if ids is None:
        return [""] * size
    if len(ids) != size:
        raise ValueError(f"`{arg}` must have one id per sample ({size}), got {len(ids)}.")
    out = []
    for sample_id in ids:
        if isinstance(sample_id, Tensor):
            sample_id = sample_id.item()
        if sample_id is None:
            out.append("")
            continue
        if isinstance(sample_id, bool) or not isinstance(sample_id, (int, str)) or sample_id == "":
            raise ValueError(
                f"`{arg}` must hold ints or non-empty strings (None for a sample without an id), got {sample_id!r}. "
                "HINT: pass the dataset's sample ids (image_id, question_id, NLVR2's identifier)."
            )
        out.append(str(sample_id))
    return out


class ListStateMetric(Metric):
    """A Metric whose list states gather with their own dtype, also from a rank that saw no sample.

    torchmetrics replaces the empty list state of a rank that saw no sample with an empty tensor of the metric's
    float dtype; gathering that against the ``uint8`` / ``int64`` tensors of the other ranks fails. Subclasses
    declare the dtype of each list state in ``_list_state_dtypes``; each becomes a ``"cat"``-reduced list state.

    Args:
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    full_state_update = False
    _list_state_dtypes: ClassVar[dict[str, torch.dtype]] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self._list_state_dtypes:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _append_texts(self, prefix: str, texts: Sequence[str]) -> None:
        """Append ``texts`` to the text state ``prefix`` (its two list states, see :func:`text_state_dtypes`)."""
        data, lengths = encode_texts(texts, self.device)
        getattr(self, f"{prefix}_bytes").append(data)
        getattr(self, f"{prefix}_lengths").append(lengths)

    def _texts(self, prefix: str) -> list[str]:
        """Every string of the text state ``prefix``, in order (after a sync: every rank's, rank by rank)."""
        data = cat_state(getattr(self, f"{prefix}_bytes"), torch.uint8)
        return decode_texts(data, cat_state(getattr(self, f"{prefix}_lengths"), torch.int64))

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        for name, dtype in self._list_state_dtypes.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.zeros(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group=process_group)
