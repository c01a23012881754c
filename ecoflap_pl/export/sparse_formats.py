"""The sparse weight layouts of ``compressed-tensors``: ``sparse-bitmask`` (any mask) and ``sparse-24-bitmask`` (2:4).

Each pruned weight ``<module>.weight`` of shape ``[rows, cols]`` is stored as tensors named after its module:

- ``sparse-bitmask``: ``<module>.compressed`` (the kept values, row-major, 1-D), ``<module>.bitmask`` (the mask packed
  8 columns per byte, little bit order: ``uint8 [rows, ceil(cols / 8)]``), ``<module>.shape`` (``int64 [2]``) and
  ``<module>.row_offsets`` (``int64 [rows]``, where each row starts in ``compressed``);
- ``sparse-24-bitmask``: ``<module>.compressed`` (the 2 kept values of every 4: ``[rows, cols / 2]``),
  ``<module>.bitmask`` and ``<module>.shape`` (``int64 [2, 1]``).

These are the layouts that ``compressed-tensors`` up to 0.14 writes and reads (its ``BitmaskCompressor`` and
``Sparse24BitMaskCompressor``). From 0.15 on, that library (and transformers 5, which needs it, and vLLM 0.19.1) no
longer handle sparse formats, so the encoding is written here; it is a few lines of packing. The bitmask is the
pruning mask itself (not ``weight != 0``), so a kept weight that happens to be zero keeps its place and the masks
come back exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

FORMATS = ("sparse-bitmask", "sparse-24-bitmask")


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``bool [rows, cols]`` -> ``uint8 [rows, ceil(cols / 8)]``, 8 columns per byte, lowest bit first."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(bits.reshape(shape).astype(bool))


def is_two_four(mask: torch.Tensor) -> bool:
    """Whether ``mask`` (``[rows, cols]``) keeps exactly 2 of every 4 consecutive weights of each row."""
    rows, cols = mask.shape
    return cols % 4 == 0 and bool((mask.reshape(rows, -1, 4).sum(dim=-1) == 2).all())


@dataclass(frozen=True)
class _Layout:
    names: tuple[str, ...]
    encode: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    decode: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def _encode_bitmask(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    counts = mask.sum(dim=-1)
    return {
        "compressed": weight[mask].contiguous(),
        "bitmask": pack_mask(mask),
        "shape": torch.tensor(list(weight.shape)),
        "row_offsets": torch.cumsum(counts, 0) - counts,
    }


def _stored_mask(bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The boolean mask a format's ``bitmask`` and ``shape`` tensors store."""
    return unpack_mask(bitmask, tuple(int(size) for size in shape.flatten()))  # type: ignore[arg-type]


def _decode_bitmask(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = _stored_mask(parts["bitmask"], parts["shape"])
    weight = torch.zeros(mask.shape, dtype=parts["compressed"].dtype)
    weight[mask] = parts["compressed"].flatten()
    return weight, mask


def _encode_24(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = weight.shape
    if not is_two_four(mask):
        raise ValueError(
            f"The `sparse-24-bitmask` format stores exactly 2 of every 4 consecutive input weights, but a [{rows}, "
            f"{cols}] mask does not have that pattern. HINT: prune with structure '2:4', or save with "
            "save_format 'sparse-bitmask' (any pattern)."
        )
    return {
        "compressed": weight[mask].reshape(rows, cols // 2).contiguous(),
        "bitmask": pack_mask(mask),
        "shape": torch.tensor([rows, cols]).reshape(-1, 1),
    }


LAYOUTS: dict[str, _Layout] = {
    "sparse-bitmask": _Layout(("compressed", "bitmask", "shape", "row_offsets"), _encode_bitmask, _decode_bitmask),
    "sparse-24-bitmask": _Layout(("compressed", "bitmask", "shape"), _encode_24, _decode_bitmask),
}


def _layout(sparse_format: str) -> _Layout:
    if sparse_format not in LAYOUTS:
        raise ValueError(f"Unknown sparse format {sparse_format!r}; known: {sorted(LAYOUTS)}.")
    return LAYOUTS[sparse_format]


def compress_state_dict(
    state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], sparse_format: str
) -> dict[str, torch.Tensor]:
    """``state_dict`` with every masked ``<module>.weight`` replaced by its ``sparse_format`` tensors (others as is).

    Raises:
        ValueError: a mask does not fit the format, or a masked weight is missing from ``state_dict``.
    """
    layout = _layout(sparse_format)
    missing = sorted(name for name in masks if name not in state_dict)
    if missing:
        raise ValueError(f"Masked weights missing from the state dict: {missing[:3]}")
    compressed: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name not in masks:
            compressed[name] = tensor
            continue
        module = name.removesuffix(".weight")
        mask = masks[name].to(device=tensor.device, dtype=torch.bool)
        for part, value in layout.encode(tensor.detach(), mask).items():
            compressed[f"{module}.{part}"] = value.cpu()
    return compressed


def read_bitmasks(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks (by weight name) that the ``bitmask`` and ``shape`` tensors of a compressed state dict hold (every
    other tensor may be left out: the kept values are not needed)."""
    masks: dict[str, torch.Tensor] = {}
    for name, packed in tensors.items():
        if name.endswith(".bitmask"):
            module = name.removesuffix(".bitmask")
            masks[f"{module}.weight"] = _stored_mask(packed, tensors[f"{module}.shape"])
    return masks


def decompress_state_dict(
    state_dict: dict[str, torch.Tensor], sparse_format: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of :func:`compress_state_dict`: the dense state dict and the masks, by weight name."""
    layout = _layout(sparse_format)
    marker = f".{layout.names[0]}"
    modules = [name.removesuffix(marker) for name in state_dict if name.endswith(marker)]
    dense = dict(state_dict)
    masks: dict[str, torch.Tensor] = {}
    for module in modules:
        parts = {part: dense.pop(f"{module}.{part}") for part in layout.names}
        dense[f"{module}.weight"], masks[f"{module}.weight"] = layout.decode(parts)
    return dense, masks
