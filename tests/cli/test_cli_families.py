"""``ecoflap validate`` on tiny LLaVA, Qwen2.5-VL, InstructBLIP and PaliGemma saved as hub models (model and
processor), on tiny VQAv2 / COCO files in the official layouts; LLaVA also with ``--model.init_args.device_map``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ecoflap_pl.models.tiny import HF_FAMILIES, tiny_processor
from tests.cli.test_cli import TRAINER, ecoflap

RUNS = {
    "llava": ("VQATask", "VQAv2DataModule"),
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
    config = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False},
        "model": {"class_path": f"ecoflap_pl.tasks.{task}", "init_args": init},
        "data": {
            "class_path": f"ecoflap_pl.datamodules.{data}",
            "init_args": {"data_dir": str(demo_data.coco), "batch_size": 2, "calibration_batch_size": 2},
        },
        "pruning": {"sparsity": 0.5, "coarse_samples": 2, "fine_samples": 2, "progress": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    ecoflap("validate", "-c", str(tmp_path / "config.yaml"), *TRAINER, "--trainer.limit_val_batches=1")
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text())
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=0.03)
    towers = set(report["towers"])
    assert len(towers) >= 2 and not [tower for tower in towers if "qformer" in tower]
    if placement is not None:
        assert report["metadata"]["placement"]["model.language_model.layers"] == "disk"
