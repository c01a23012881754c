"""``ecoflap validate`` and ``ecoflap prune`` on tiny LLaVA, Qwen2-VL, Qwen2.5-VL, InstructBLIP, PaliGemma and SigLIP
saved as hub models (model and processor), on tiny VQAv2 / COCO / ImageNet files in the official layouts; LLaVA also
with ``--model.init_args.device_map``."""

from __future__ import annotations

import json

import pytest
import torch

from ecoflap_pl.models.tiny import HF_FAMILIES, tiny_processor
from tests.cli.test_cli import TRAINER, ecoflap, write_config

RUNS = {
    "llava": ("VQATask", "VQAv2DataModule"),
    "qwen2_vl": ("VQATask", "VQAv2DataModule"),
    "qwen2_5_vl": ("VQATask", "VQAv2DataModule"),
    "instructblip": ("VQATask", "VQAv2DataModule"),
    "paligemma": ("CaptioningTask", "COCOCaptionDataModule"),
}
LLAVA_ON_DISK = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers": "disk",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def _saved(tmp_path, family, demo_data):
    corpus = demo_data.corpus.read_text(encoding="utf-8").splitlines()
    config, processor = tiny_processor(family, corpus, vocab_size=128)
    torch.manual_seed(0)
    folder = tmp_path / f"tiny-{family}"
    HF_FAMILIES[family](config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("family", "placement"), [(family, None) for family in RUNS] + [("llava", "disk")])
def test_validate_prunes_a_generative_family(tmp_path, demo_data, family, placement):
    task, data = RUNS[family]
    init = {"pretrained": str(_saved(tmp_path, family, demo_data)), "num_beams": 1, "max_new_tokens": 2}
    if task == "CaptioningTask":
        init["min_new_tokens"] = 0
    if placement is not None:
        init.update(device_map=LLAVA_ON_DISK, offload_folder=str(tmp_path / "offload"))
    config = write_config(tmp_path, task, data, demo_data.coco, init)
    ecoflap("validate", "-c", config, *TRAINER, "--trainer.limit_val_batches=1")
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text())
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=0.03)
    towers = set(report["towers"])
    assert len(towers) >= 2 and not [tower for tower in towers if "qformer" in tower]
    if placement is not None:
        assert report["metadata"]["placement"]["model.language_model.layers"] == "disk"


@pytest.mark.parametrize(
    ("family", "task", "data", "pruned"),
    [
        ("qwen2_vl", "CaptioningTask", "COCOCaptionDataModule", "model.language_model.layers.0.mlp.up_proj.weight"),
        ("qwen2_5_vl", "VQATask", "VQAv2DataModule", "model.visual.blocks.1.mlp.up_proj.weight"),
    ],
)
def test_prune_saves_a_qwen_vl_model(tmp_path, demo_data, family, task, data, pruned):
    folder = _saved(tmp_path, family, demo_data)
    init = {"pretrained": str(folder), "num_beams": 1, "max_new_tokens": 2}
    if task == "CaptioningTask":
        init["min_new_tokens"] = 0
    config = write_config(tmp_path, task, data, demo_data.coco, init, save_to=str(tmp_path / "pruned"))
    ecoflap("prune", "-c", config, *TRAINER)
    weights, originals = (
        dict(HF_FAMILIES[family].from_pretrained(path).named_parameters()) for path in (tmp_path / "pruned", folder)
    )
    report = json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())
    # the saved weight holds its block's share of the 50% budget, as reported
    assert (weights[pruned] == 0).float().mean().item() == pytest.approx(report["target_sparsity"][pruned], abs=1e-3)
    merger = "model.visual.merger.mlp.0.weight"
    assert torch.equal(weights[merger], originals[merger])  # the merger is not a candidate
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert {"model.visual.blocks", "model.language_model.layers"} <= set(report["towers"])


def test_siglip_zero_shot_imagenet_and_pruned_retrieval(tmp_path, demo_data):
    """SigLIP: validate prunes both towers before ImageNet zero-shot; prune saves the retrieval model."""
    folder = _saved(tmp_path, "siglip", demo_data)
    config = write_config(
        tmp_path / "zero_shot",
        "ZeroShotClassificationTask",
        "ImageNetDataModule",
        demo_data.imagenet,
        {"pretrained": str(folder)},
    )
    ecoflap("validate", "-c", config, *TRAINER, "--trainer.limit_val_batches=1")
    report = json.loads((tmp_path / "zero_shot" / "run" / "pruning_report.json").read_text())
    assert set(report["towers"]) == {"vision_model.encoder.layers", "text_model.encoder.layers"}
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)

    config = write_config(
        tmp_path / "retrieval",
        "RetrievalTask",
        "COCOCaptionDataModule",
        demo_data.coco,
        {"pretrained": str(folder)},
        save_to=str(tmp_path / "pruned"),
        importance="uniform",
    )
    ecoflap("prune", "-c", config, *TRAINER)
    pruned = HF_FAMILIES["siglip"].from_pretrained(tmp_path / "pruned")
    fc1 = pruned.text_model.encoder.layers[0].mlp.fc1.weight
    assert (fc1 == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    head = pruned.vision_model.head.mlp.fc1.weight
    assert not torch.any(head == 0)  # the attention-pooling head is not a candidate
