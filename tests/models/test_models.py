"""models/: offline tokenizers with fixed special ids, tiny configs of every family, the model/tokenizer loaders."""

from __future__ import annotations

import pytest
import torch
from transformers import T5ForConditionalGeneration

from ecoflap_pl.models.loading import build_hf_model, load_tokenizer
from ecoflap_pl.models.tiny import HF_FAMILIES, tiny_config, tiny_model, tiny_timm
from ecoflap_pl.models.tokenizers import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, SPECIAL_TOKENS, train_tokenizer
from ecoflap_pl.tasks.model_config import load_config

CORPUS = ["a red 3 and a blue 7", "what digit is on the left ?", "two digits"] * 4


@pytest.mark.parametrize(
    ("template", "first", "last"),
    [("none", None, None), ("bos", BOS_ID, None), ("eos", None, EOS_ID), ("bos_eos", BOS_ID, EOS_ID)],
)
def test_templates_wrap_sequences_with_the_fixed_ids(template, first, last):
    tokenizer = train_tokenizer(CORPUS, vocab_size=60, template=template)
    plain = train_tokenizer(CORPUS, vocab_size=60)("a red 3")["input_ids"]
    ids = tokenizer("a red 3")["input_ids"]
    assert ids == [i for i in (first, *plain, last) if i is not None]
    assert tokenizer.decode(plain) == "a red 3"
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.pad_token_id == PAD_ID and tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID


def test_special_tokens_are_matched_whole():
    tokenizer = train_tokenizer(CORPUS, vocab_size=60)
    ids = tokenizer("<image><image>two digits</s>")["input_ids"]
    assert ids[:2] == [IMAGE_ID, IMAGE_ID] and ids[-1] == EOS_ID and len(ids) == 5


def test_same_corpus_same_ids():
    assert train_tokenizer(CORPUS, vocab_size=60).get_vocab() == train_tokenizer(CORPUS, vocab_size=60).get_vocab()


def test_saved_tokenizer_loads_back(tmp_path):
    train_tokenizer(CORPUS, vocab_size=60, template="eos").save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))("two digits")["input_ids"][-1] == EOS_ID


def test_load_tokenizer_names_the_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not be loaded from"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_bad_tokenizer_arguments():
    with pytest.raises(ValueError, match="`template` must be one of"):
        train_tokenizer(CORPUS, template="gpt")
    with pytest.raises(ValueError, match="`vocab_size` must be >"):
        train_tokenizer(CORPUS, vocab_size=4)


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_tiny_models_are_seeded_and_small(family):
    first, second = tiny_model(family, seed=3), tiny_model(family, seed=3)
    assert isinstance(first, HF_FAMILIES[family]) and not first.training
    assert sum(p.numel() for p in first.parameters()) < 200_000
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["vit", "eva"])
def test_tiny_timm_models_classify(family):
    logits = tiny_timm(family, num_classes=5)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5)


def test_unknown_families_are_errors():
    with pytest.raises(ValueError, match="`family` must be one of"):
        tiny_config("gpt2")
    with pytest.raises(ValueError, match="`family` must be one of"):
        tiny_timm("swin")


def test_build_hf_model_from_config_dict_or_directory(tmp_path):
    config = tiny_config("t5").to_dict()
    model = build_hf_model(T5ForConditionalGeneration, config=config)
    model.save_pretrained(tmp_path)
    loaded = build_hf_model(T5ForConditionalGeneration, pretrained=str(tmp_path))
    assert torch.equal(model.shared.weight, loaded.shared.weight)
    with pytest.raises(ValueError, match="Exactly one of `pretrained` and `model_config`"):
        build_hf_model(T5ForConditionalGeneration, pretrained=str(tmp_path), config=config)


def test_a_pretrained_folder_without_config_names_the_model_folder_inside_it(tmp_path):
    """transformers said "Unrecognized model in DIR. Should have a `model_type` key in its config.json" of a folder
    with no config.json at all (the runs folder above a save_to export, a data folder)."""
    model = build_hf_model(T5ForConditionalGeneration, config=tiny_config("t5").to_dict())
    model.save_pretrained(tmp_path / "runs" / "pruned")
    model.save_pretrained(tmp_path / "runs" / ".backup")  # a hidden folder is neither searched nor named
    (tmp_path / "runs" / "logs").mkdir()
    for load in (lambda path: load_config(path, None), lambda path: build_hf_model(T5ForConditionalGeneration, path)):
        with pytest.raises(FileNotFoundError) as raised:
            load(str(tmp_path / "runs"))
        assert str(raised.value) == (
            f"`pretrained` '{tmp_path / 'runs'}' is a folder without config.json, so it holds no model. HINT: point "
            f"`pretrained` at the model folder inside it: {tmp_path / 'runs' / 'pruned'}."
        )
        with pytest.raises(FileNotFoundError, match=r"without config.json, so it holds no model\. HINT: give the"):
            load(str(tmp_path / "runs" / "logs"))


def test_a_pretrained_folder_without_weights_says_they_were_not_copied(tmp_path):
    """transformers said "Error no file named model.safetensors, or pytorch_model.bin, found in directory DIR"."""
    model = build_hf_model(T5ForConditionalGeneration, config=tiny_config("t5").to_dict())
    model.save_pretrained(tmp_path / "copy")
    (tmp_path / "copy" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds config.json but no weight files .*HINT: copy the model's"):
        build_hf_model(T5ForConditionalGeneration, str(tmp_path / "copy"))


@pytest.mark.parametrize("family", ["blip2_opt", "blip"])
def test_vision_towers_start_from_a_real_initialisation(family):
    images = torch.randn(2, 3, 32, 32)
    embeddings = tiny_model(family).vision_model(pixel_values=images).pooler_output
    assert (embeddings[0] - embeddings[1]).abs().max() > 1e-3
