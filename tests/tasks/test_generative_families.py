"""LLaVA, Qwen2-VL, Qwen2.5-VL, InstructBLIP and PaliGemma through VQATask and CaptioningTask, each with its own
processor and prompt format, pruned by the callback with both towers in one global budget."""

from __future__ import annotations

import pytest
import torch

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.models.tiny import HF_FAMILIES, tiny_processor
from ecoflap_pl.tasks import CaptioningTask, VQATask
from ecoflap_pl.tasks._vision_language import IGNORE_INDEX

CORPUS = (
    "a dog runs on the green grass",
    "a red bus parked near the street",
    "two cats sleeping on a couch",
    "a man riding a horse on the beach",
    "what color is the bus? how many cats are there? is the dog running?",
    "red blue two one yes no",
)
"""The texts of the samples of ``tests/tasks/conftest.py`` (captions, questions, answers)."""
GENERATIVE = ("llava", "qwen2_vl", "qwen2_5_vl", "instructblip", "paligemma")
TOWERS = {
    "llava": ("model.vision_tower.", "model.language_model."),
    "qwen2_vl": ("model.visual.", "model.language_model."),
    "qwen2_5_vl": ("model.visual.", "model.language_model."),
    "instructblip": ("vision_model.", "language_model."),
    "paligemma": ("model.vision_tower.", "model.language_model."),
}
"""Family -> (vision tower, language model) parameter prefixes."""
ZEROTH_ORDER = {
    "sparsity": 0.5,
    "importance": "zeroth_order",
    "coarse_samples": 2,
    "fine_samples": 2,
    "stages": ["validate"],
    "progress": False,
}


@pytest.fixture(scope="module")
def family_setup(tmp_path_factory):
    """``family_setup(family)``: ``(config dict, tokenizer dir)`` of a tiny model and its offline tokenizer."""
    made = {}

    def make(family):
        if family not in made:
            config, processor = tiny_processor(family, list(CORPUS) * 3)
            path = tmp_path_factory.mktemp(f"tokenizer_{family}")
            processor.tokenizer.save_pretrained(path)
            made[family] = (config.to_dict(), str(path))
        return made[family]

    return make


def _vqa(family_setup, family, **kwargs):
    config, tokenizer = family_setup(family)
    return VQATask(model_config=config, tokenizer=tokenizer, num_beams=1, max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("family", GENERATIVE)
def test_vqa_loss_scores_the_answer_alone(family_setup, vqa_samples, family):
    task = _vqa(family_setup, family)
    batch = task.collator(vqa_samples)
    tokenizer = task.processor.tokenizer
    for row, sample in enumerate(vqa_samples):
        scored = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert tokenizer.decode(scored, skip_special_tokens=True).strip() == sample["answer"]
        assert int(scored[-1]) == tokenizer.eos_token_id
    assert torch.isfinite(task.calibration_loss(batch))
    decoder_only = family != "instructblip"  # the tiny InstructBLIP has a FlanT5-style encoder-decoder
    assert bool(batch["prompt_attention_mask"][:, -1].all()) == decoder_only  # decoder-only prompts: left padded
    answers = task.answer(batch)
    assert len(answers) == len(vqa_samples) and all(isinstance(answer, str) for answer in answers)


def test_prompt_formats(family_setup, vqa_samples):
    llava = _vqa(family_setup, "llava")
    assert llava.prompt == "USER: <image>\n{} ASSISTANT:"
    paligemma = _vqa(family_setup, "paligemma")
    assert paligemma.prompt == "answer en {}"
    qwen = _vqa(family_setup, "qwen2_5_vl")
    text = qwen.collator.encoder.text(qwen.prompt.format("what color is the bus?"))
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what color is the bus?")
    assert text.endswith("<|im_start|>assistant\n")
    batch = qwen.collator(vqa_samples)
    image_tokens = (batch["prompt_input_ids"] == qwen.model.config.image_token_id).sum(dim=1)
    merge = qwen.model.config.vision_config.spatial_merge_size**2
    assert image_tokens.tolist() == (batch["image_grid_thw"].prod(dim=1) // merge).tolist()  # one per merged patch


@pytest.mark.parametrize("family", GENERATIVE)
def test_captioning_trains_and_generates(family_setup, caption_train_samples, caption_eval_samples, family):
    config, tokenizer = family_setup(family)
    task = CaptioningTask(model_config=config, tokenizer=tokenizer, num_beams=1, max_new_tokens=3, min_new_tokens=1)
    batch = task.collator(caption_train_samples)
    scored = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert task.processor.tokenizer.decode(scored, skip_special_tokens=True) == caption_train_samples[0]["text"]
    assert torch.isfinite(task.calibration_loss(batch))
    assert len(task.generate(task.collator(caption_eval_samples))) == len(caption_eval_samples)


@pytest.mark.parametrize("family", GENERATIVE)
def test_callback_prunes_both_towers_in_one_budget(
    family_setup, trainer_factory, datamodule_factory, vqa_samples, family
):
    task = _vqa(family_setup, family)
    dense = {name: param.detach().clone() for name, param in task.model.named_parameters()}
    pruning = ECoFLaPPruning(**ZEROTH_ORDER)
    datamodule = datamodule_factory(vqa_samples, vqa_samples)
    (metrics,) = trainer_factory(callbacks=[pruning]).validate(task, datamodule=datamodule, verbose=False)
    assert "val/accuracy" in metrics
    result = pruning.result
    vision, language = TOWERS[family]
    assert {tower for tower in (vision, language) if any(name.startswith(tower) for name in result.masks)} == {
        vision,
        language,
    }
    assert result.overall_sparsity == pytest.approx(0.5, abs=0.03)
    assert len({round(value, 4) for value in result.group_sparsity.values()}) > 1  # the coarse step allocated
    for name, param in task.model.named_parameters():
        if name in result.masks:
            assert (param[~result.masks[name]] == 0).all(), name
        else:  # projectors, merger, Q-Former, embeddings, norms and heads are not candidates
            assert torch.equal(param, dense[name]), name
    untouched = ("multi_modal_projector", "merger", "qformer", "language_projection", "embed", "lm_head")
    assert not [name for name in result.masks if any(part in name for part in untouched)]


def test_errors_name_the_argument(family_setup):
    with pytest.raises(ValueError, match="`prompt` must hold '<image>' once"):
        _vqa(family_setup, "llava", prompt="Question: {} Answer:")
    config, tokenizer = family_setup("paligemma")
    small = {**config, "text_config": {**config["text_config"], "vocab_size": 100}}
    with pytest.raises(ValueError, match="HINT: build the model config with vocab_size"):
        VQATask(model_config=small, tokenizer=tokenizer)


OFFLOADED = {
    "llava": {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.layers.0": "disk",
        "model.language_model.layers.1": "disk",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "cpu",
    },
    "qwen2_5_vl": {  # windowed and full-attention vision blocks on disk, the language model in CPU memory
        "model.visual.patch_embed": "cpu",
        "model.visual.rotary_pos_emb": "cpu",
        "model.visual.blocks": "disk",
        "model.visual.merger": "cpu",
        "model.language_model": "cpu",
        "lm_head": "cpu",
    },
}
"""Family -> a device map holding one tower's blocks on disk."""


@pytest.mark.parametrize("family", list(OFFLOADED))
def test_callback_prunes_a_disk_offloaded_model_as_the_model_in_memory(
    tmp_path, trainer_factory, datamodule_factory, vqa_samples, family
):
    """``device_map`` with blocks on disk: the same allocation and masks as the model in memory (both scored with
    recorded block outputs and batched probes), and the report records the placement."""
    config, processor = tiny_processor(family, list(CORPUS) * 3)
    torch.manual_seed(0)
    HF_FAMILIES[family](config).save_pretrained(tmp_path / family)
    processor.save_pretrained(tmp_path / family)
    device_map = OFFLOADED[family]
    runs = []
    for placement in ({}, {"device_map": device_map, "offload_folder": str(tmp_path / "offload")}):
        task = VQATask(pretrained=str(tmp_path / family), num_beams=1, max_new_tokens=2, **placement)
        pruning = ECoFLaPPruning(
            sparsity=0.5,
            importance="zeroth_order",
            coarse_samples=2,
            fine_samples=2,
            stages=["validate"],
            progress=False,
        )
        trainer_factory(callbacks=[pruning]).validate(
            task, datamodule=datamodule_factory(vqa_samples, vqa_samples), verbose=False
        )
        runs.append(pruning)
    in_memory, offloaded = runs
    assert in_memory.report["metadata"]["placement"] is None
    assert offloaded.report["metadata"]["placement"] == device_map
    assert offloaded.result.group_scores == in_memory.result.group_scores
    assert offloaded.result.stages["coarse"].probe_replicas >= 1  # the fast path ran to its end, no fallback
    assert offloaded.result.group_sparsity == in_memory.result.group_sparsity
    for name, mask in in_memory.masks.items():
        assert torch.equal(offloaded.masks[name], mask), name
