"""Which readers load the sparse save formats back: each folder compared tensor by tensor with the pruned model.

``write`` (the project's environment) prunes a tiny LLaMA and a tiny BLIP-2 OPT to 50% (unstructured, saved as
``sparse-bitmask``; 2:4, saved as ``sparse-24-bitmask``) and writes each through ``save_pruned``, as
``--pruning.save_to`` does (model, masks, report), beside the pruned model's own state dict
(``<case>.reference.safetensors``). ``read`` loads every folder with one reader and prints one line per folder:
``equal`` (every tensor of the reference, ``torch.equal``), ``random`` (only pruned weights differ: left at their
initialisation), or the error. ``read`` imports nothing of the project but for the ``load_pruned_model`` reader, so it
runs in any environment with torch and transformers: the readers of the table in benchmarks/RESULTS.md ("Sparse
formats read back by compressed-tensors 0.14") each run in their own venv.

Usage::

    python benchmarks/sparse_readers.py write /tmp/sparse
    python benchmarks/sparse_readers.py read /tmp/sparse --reader load_pruned_model
    python benchmarks/sparse_readers.py read /tmp/sparse --reader from_pretrained  # any transformers, with or
                                                                                   # without compressed-tensors
    python benchmarks/sparse_readers.py read /tmp/sparse --reader decompress       # compressed-tensors 0.14
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger("sparse_readers")
CASES = {"50% unstructured": ("unstructured", "sparse-bitmask"), "2:4": ("2:4", "sparse-24-bitmask")}
FAMILIES = ("llama", "blip2_opt")
FIRST_WORD_ID, VOCAB = 8, 128  # the tiny models' first ordinary token id (ecoflap_pl.models.tokenizers) and vocabulary


def _batches(family: str, count: int = 2, size: int = 2) -> list[dict[str, torch.Tensor]]:
    from ecoflap_pl.models.tokenizers import IMAGE_ID

    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        words = torch.randint(FIRST_WORD_ID, VOCAB, (size, 10), generator=generator)
        if family == "llama":
            batches.append({"input_ids": words, "labels": words})
        else:  # transformers 5 scatters the Q-Former outputs into the image placeholders (num_query_tokens = 4)
            words[:, :4] = IMAGE_ID
            pixels = torch.randn(size, 3, 32, 32, generator=generator)
            batches.append(
                {"pixel_values": pixels, "input_ids": words, "labels": words.masked_fill(words == IMAGE_ID, -100)}
            )
    return batches


def write(folder: Path) -> None:
    """Prune the tiny models and write every case into ``folder``."""
    from ecoflap_pl.callbacks.export import save_pruned
    from ecoflap_pl.models.tiny import tiny_model
    from ecoflap_pl.pruning import PruningConfig, prune

    folder.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        for structure, save_format in CASES.values():
            model = tiny_model(family)
            config = PruningConfig(
                sparsity=0.5, structure=structure, importance="uniform", method="wanda", fine_samples=4
            )
            result = prune(model, _batches(family), lambda m, batch: m(**batch).loss, config)
            case = f"{family}-{save_format}"
            save_pruned(
                model,
                folder / case,
                masks=result.masks,
                save_format=save_format,
                processors=(),
                result=result,
                metadata=None,
            )
            reference = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
            save_file(reference, str(folder / f"{case}.reference.safetensors"))
            pruned = json.dumps(sorted(result.masks))
            (folder / f"{case}.pruned.json").write_text(pruned, encoding="utf-8")
            logger.info("wrote %s", folder / case)


def _load(reader: str, case: Path) -> dict[str, torch.Tensor]:
    import transformers

    if reader == "load_pruned_model":
        from ecoflap_pl.export import load_pruned_model

        return load_pruned_model(case).state_dict()
    config = json.loads((case / "config.json").read_text(encoding="utf-8"))
    model_class = getattr(transformers, config["architectures"][0])
    if reader == "from_pretrained":
        return model_class.from_pretrained(case, dtype=torch.float32).state_dict()
    from compressed_tensors import ModelCompressor

    model = model_class(transformers.AutoConfig.from_pretrained(case))
    ModelCompressor.from_compression_config(config["quantization_config"]).decompress(model_path=str(case), model=model)
    return model.state_dict()


def _verdict(reader: str, case: Path) -> str:
    reference = load_file(str(case.with_name(f"{case.name}.reference.safetensors")))
    pruned = set(json.loads(case.with_name(f"{case.name}.pruned.json").read_text(encoding="utf-8")))
    try:
        loaded = _load(reader, case)
    except Exception as error:  # the verdict is the error, whatever its type
        return f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    differ = sorted(
        name for name, tensor in reference.items() if name not in loaded or not torch.equal(loaded[name], tensor)
    )
    if not differ:
        return "equal"
    if set(differ) <= pruned:
        return f"random ({len(differ)} of {len(pruned)} pruned weights differ)"
    return f"differ: {len(differ)} tensors, e.g. {differ[:3]}"


def read(folder: Path, reader: str) -> None:
    """Print one reader's verdict on every case of ``folder``."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        from compressed_tensors import __version__ as compressed_tensors
    except ImportError:
        compressed_tensors = "not installed"
    logger.info(
        "reader %s: transformers %s, compressed-tensors %s", reader, transformers.__version__, compressed_tensors
    )
    for case in sorted(path for path in folder.iterdir() if path.is_dir()):
        logger.info("  %s: %s", case.name, _verdict(reader, case))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("write").add_argument("folder", type=Path)
    reading = commands.add_parser("read")
    reading.add_argument("folder", type=Path)
    reading.add_argument("--reader", choices=("load_pruned_model", "from_pretrained", "decompress"), required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    if args.command == "write":
        write(args.folder)
    else:
        read(args.folder, args.reader)


if __name__ == "__main__":
    main()
