"""Shipping a pruned model: atomic folder writes, dense and compressed save formats, its model card, 2:4 sparse
kernels.

Imports torch, safetensors, huggingface_hub, rich (through the report) and (lazily) transformers; no Lightning.
"""

from ecoflap_pl.export.atomic import atomic_directory, check_free_space, check_save_target, check_writable_folder
from ecoflap_pl.export.checkpoint import (
    SAVE_FORMATS,
    SavedModel,
    check_masks_fit_save_format,
    check_save_format,
    has_saved_masks,
    is_sparse_export,
    least_export_bytes,
    load_pruned_model,
    load_pruned_state_dict,
    read_masks,
    tensor_bytes,
    write_pruned_model,
)
from ecoflap_pl.export.model_card import MODEL_CARD, model_card, write_model_card

__all__ = [
    "MODEL_CARD",
    "SAVE_FORMATS",
    "SavedModel",
    "atomic_directory",
    "check_free_space",
    "check_masks_fit_save_format",
    "check_save_format",
    "check_save_target",
    "check_writable_folder",
    "has_saved_masks",
    "is_sparse_export",
    "least_export_bytes",
    "load_pruned_model",
    "load_pruned_state_dict",
    "model_card",
    "read_masks",
    "tensor_bytes",
    "write_model_card",
    "write_pruned_model",
]
