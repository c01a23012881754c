"""The demo models' building blocks: the ViT -> BLIP-2 vision tower transfer, the build cache, the presets, the
training data."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from transformers import Blip2VisionModel, BlipImageProcessor

from ecoflap_pl.demo import get_preset
from ecoflap_pl.demo.blip2 import demo_blip2_config, vision_tower_weights
from ecoflap_pl.demo.cache import ENV_DIR, cached_build, demo_dir, read_marker
from ecoflap_pl.demo.presets import Blip2Recipe, VitRecipe
from ecoflap_pl.demo.training import MultitaskCollator, SingleTaskBatches, VQACaptionMixDataModule
from ecoflap_pl.demo.vit import TIMM_ARCHITECTURE, vit_model_config


def test_blip2_vision_tower_computes_the_demo_vits_features() -> None:
    vit_recipe = VitRecipe(hidden_size=32, layers=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    vit = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, **vit_model_config(vit_recipe)).eval()
    with torch.no_grad():  # timm zero-initialises biases and LayerNorm offsets: make every mapped tensor matter
        for parameter in vit.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = demo_blip2_config(Blip2Recipe(hidden_size=64), vit_recipe, vocab_size=64)
    tower = Blip2VisionModel(config.vision_config).eval()
    tower.load_state_dict(vision_tower_weights(vit.state_dict()), strict=True)
    assert config.qformer_config.encoder_hidden_size == 32
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixel_values=pixels).last_hidden_state, vit.forward_features(pixels))


def test_cached_build_reuses_a_matching_build_and_rebuilds_a_changed_one(tmp_path: Path) -> None:
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "weights.txt").write_text(str(len(calls)))

    target = tmp_path / "models" / "thing"
    assert cached_build(target, {"steps": 3}, build) == target
    assert cached_build(target, {"steps": 3}, build) == target
    assert len(calls) == 1 and read_marker(target) == {"steps": 3}
    cached_build(target, {"steps": 4}, build)
    assert len(calls) == 2 and (target / "weights.txt").read_text() == "2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing"]  # no temporary or old copies left


def test_an_interrupted_build_leaves_the_previous_one_untouched(tmp_path: Path) -> None:
    target = tmp_path / "thing"
    cached_build(target, {"steps": 3}, lambda out: (out / "weights.txt").write_text("good"))

    def failing(out: Path) -> None:
        (out / "weights.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_build(target, {"steps": 4}, failing)
    assert (target / "weights.txt").read_text() == "good" and read_marker(target) == {"steps": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_demo_dir_is_the_argument_then_the_environment_then_the_user_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "env"))
    assert demo_dir(tmp_path / "arg") == tmp_path / "arg"
    assert demo_dir() == tmp_path / "env"
    monkeypatch.delenv(ENV_DIR)
    assert demo_dir() == Path("~/.cache/ecoflap-pl/demo").expanduser()


def test_unknown_preset_names_the_choices() -> None:
    assert get_preset("tiny").name == "tiny"
    with pytest.raises(ValueError, match=r"`preset` must be one of \['default', 'tiny'\], got 'huge'"):
        get_preset("huge")


def test_single_task_batches_cover_each_sample_once_and_never_mix_datasets() -> None:
    lengths, batch_size = [7, [5] * 12], 4
    sampler = SingleTaskBatches(lengths, batch_size, torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 + 3
    assert sorted(i for batch in batches for i in batch) == list(range(19))
    assert all(max(batch) < 7 or min(batch) >= 7 for batch in batches)
    assert list(SingleTaskBatches(lengths, batch_size, torch.Generator().manual_seed(0))) == batches
    assert list(SingleTaskBatches(lengths, batch_size, torch.Generator().manual_seed(1))) != batches


def test_single_task_batches_group_samples_of_similar_length() -> None:
    lengths = torch.randint(1, 21, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = list(SingleTaskBatches([lengths], 4, torch.Generator().manual_seed(0)))
    assert sorted(i for batch in batches for i in batch) == list(range(400))
    spread = [max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in batches]
    assert sum(spread) / len(spread) < 1.5  # shuffled batches of 4 of lengths 1..20 spread about 10


def test_multitask_collator_routes_each_batch_and_rejects_mixed_ones() -> None:
    collator = MultitaskCollator(lambda samples: {"task": "vqa"}, lambda samples: {"task": "captions"})
    assert collator([{"question": "q", "image": None}]) == {"task": "vqa"}
    assert collator([{"text": "t", "image": None}] * 2) == {"task": "captions"}
    with pytest.raises(ValueError, match="A batch must hold only VQA samples"):
        collator([{"question": "q"}, {"text": "t"}])


def test_training_images_are_preprocessed_once_and_served_as_the_processor_makes_them(tmp_path: Path) -> None:
    paths = get_preset("tiny").data.build(tmp_path)
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    processed = []

    def preprocess(samples: list[dict]) -> torch.Tensor:
        processed.extend(sample["image"] for sample in samples)
        return processor([sample["image"] for sample in samples], return_tensors="pt")["pixel_values"]

    cached = VQACaptionMixDataModule(paths.coco, preprocess=preprocess).dataset("train")
    raw = VQACaptionMixDataModule(paths.coco).dataset("train")
    assert len(cached) == len(raw) == 24 + 24 * 5  # one question and five captions per training scene
    for _ in range(2):
        for index in range(len(cached)):
            sample, expected = cached[index], raw[index]
            assert sorted(sample) == sorted({**expected, "pixel_values": None}.keys() - {"image"})
            assert all(sample[key] == expected[key] for key in expected if key != "image")
            pixels = processor(expected["image"], return_tensors="pt")["pixel_values"][0]
            assert torch.equal(sample["pixel_values"], pixels)
    assert len(processed) == 24  # each scene once, shared by its question and its captions, over both epochs
