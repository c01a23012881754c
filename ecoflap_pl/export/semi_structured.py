"""Run 2:4-pruned Linear layers on sparse tensor cores: PyTorch's semi-structured sparse tensors (CUDA, 16-bit).

``torch.sparse.to_sparse_semi_structured`` stores a 2:4 weight as its kept half plus metadata, and ``F.linear`` on it
dispatches to the CUTLASS / cuSPARSELt sparse kernels (NVIDIA compute capability 8.0+). For evaluation and inference
only: the swapped weights are not trainable.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from ecoflap_pl.export.sparse_formats import is_two_four

logger = logging.getLogger(__name__)

_OPTION = "semi_structured"


def check_semi_structured(structure: str, device: torch.device | None = None) -> None:
    """Raise unless 2:4 masks on ``device`` can run on semi-structured sparse kernels.

    Args:
        structure: the masks' structure (``"2:4"``, ``"unstructured"``, ...).
        device: the device the model runs on; ``None`` (before the Trainer picks one) checks only that this machine
            has a CUDA GPU at all.

    Raises:
        ValueError: ``structure`` is not ``"2:4"``, no CUDA GPU (on ``device``, or on this machine), or a GPU of
            compute capability below 8.0.
    """
    if structure != "2:4":
        raise ValueError(
            f"`{_OPTION}` runs 2:4 masks on sparse kernels, but `structure` is {structure!r}. HINT: prune with "
            f"structure '2:4' (and importance 'uniform'), or leave {_OPTION} false."
        )
    if device is None and torch.cuda.is_available():
        return
    if device is None or device.type != "cuda":
        where = "torch sees no CUDA GPU on this machine" if device is None else f"the model runs on {device}"
        raise ValueError(
            f"`{_OPTION}` needs a CUDA GPU (semi-structured sparse kernels exist only there), but {where}. HINT: run "
            f"on a GPU (--trainer.accelerator gpu), or leave {_OPTION} false: the masked dense model gives the same "
            "outputs, without the speed-up."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        raise ValueError(
            f"`{_OPTION}` needs sparse tensor cores (compute capability 8.0+, e.g. A100, H100), but {device} has "
            f"{capability[0]}.{capability[1]}. HINT: leave {_OPTION} false on this GPU."
        )


def to_semi_structured_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Swap the weight of every 2:4-masked ``nn.Linear`` of ``model`` for a semi-structured sparse tensor, in place.

    Weights whose shape or dtype the kernels do not take (16-bit floats; both sizes multiples of the kernel tile) stay
    dense. Call :func:`check_semi_structured` first.

    Args:
        model: a model on a CUDA device whose masked weights are zero where their mask is ``False``.
        masks: 2:4 masks (``True`` = kept) by weight name.

    Returns:
        The names of the swapped weights.

    Raises:
        ValueError: a mask is not 2:4, or no weight could be swapped (e.g. float32 weights).
    """
    from torch.sparse import to_sparse_semi_structured

    swapped, kept_dense = [], []
    for name, mask in masks.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        if not isinstance(module, nn.Linear) or name.rpartition(".")[2] != "weight":
            continue
        if not is_two_four(mask):
            raise ValueError(f"`{_OPTION}` needs 2:4 masks, but the mask of {name} is not 2:4.")
        try:
            sparse = to_sparse_semi_structured(module.weight.detach())
        except RuntimeError as error:  # shape or dtype the kernels do not take
            kept_dense.append(name)
            logger.debug("%s stays dense: %s", name, error)
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        swapped.append(name)
    if masks and not swapped:
        dtypes = sorted({str(model.get_parameter(name).dtype) for name in kept_dense})
        raise ValueError(
            f"`{_OPTION}`: none of the {len(kept_dense)} pruned weight matrices fits the sparse kernels (dtypes "
            f"{dtypes}). HINT: run in 16 bits (--trainer.precision bf16-true); sizes must be multiples of 64."
        )
    logger.info(
        "2:4 sparse kernels on %d of %d pruned weight matrices (%d kept dense)",
        len(swapped),
        len(masks),
        len(kept_dense),
    )
    return swapped
