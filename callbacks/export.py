"""Writing a pruned model so it loads elsewhere, zeros in place."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

logger = logging.getLogger(__name__)

STATE_DICT_FILE = "model.safetensors"


def _is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def save_pruned_model(model: nn.Module, directory: str | Path, *processors: object) -> Path:
    """Save ``model`` into ``directory``.

    A Hugging Face ``PreTrainedModel`` is written with ``save_pretrained`` (load it back with
    ``ModelClass.from_pretrained(directory)``); any other module (timm, plain PyTorch) as its state dict in
    ``model.safetensors`` (``safetensors.torch.load_model(model, path)`` or timm's ``load_checkpoint``). Every
    ``processors`` object with a ``save_pretrained`` method (tokenizer, processor) is saved beside it.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if _is_hf_model(model):
        model.save_pretrained(directory)  # type: ignore[operator]
    else:
        from safetensors.torch import save_model

        save_model(model, str(directory / STATE_DICT_FILE))
    for processor in processors:
        save = getattr(processor, "save_pretrained", None)
        if callable(save):
            save(directory)
    logger.info("Pruned %s saved to %s", type(model).__name__, directory)
    return directory
