"""CaptioningTask: BLIP-2 (OPT, FlanT5) and BLIP with tiny random models: batches, loss, training, scores, loading."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import Blip2Processor

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.models.tokenizers import IMAGE_ID
from ecoflap_pl.tasks.captioning import CaptioningTask
from ecoflap_pl.tasks.labels import IGNORE_INDEX, prefix_split
from tests.tasks.task_helpers import fit_changed_weights

FAMILIES = ("blip2_opt", "blip2_t5", "blip")
NUM_QUERY_TOKENS = 4  # tiny_config's default


def _task(tiny_setup, family: str, **kwargs) -> CaptioningTask:  # noqa: ANN001, ANN003
    config, tokenizer = tiny_setup(family)
    torch.manual_seed(0)
    options = {"num_beams": 2, "max_new_tokens": 3, "min_new_tokens": 1, "learning_rate": 1e-3}
    options.update(kwargs)
    return CaptioningTask(model_config=config, tokenizer=tokenizer, **options)


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor(
        [[value] * (width - len(row)) + row if left else row + [value] * (width - len(row)) for row in rows]
    )


def _expected_inputs(task: CaptioningTask, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and labels built by hand from the tokenizer, independently of the collator."""
    tok = task.processor.tokenizer
    words = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids, labels = [], []
    for caption in captions:
        if task.family == "blip2_opt":
            prompt = [tok.bos_token_id, *words(task.prompt)]
            ids.append([IMAGE_ID] * NUM_QUERY_TOKENS + prompt + words(caption))
            labels.append([IGNORE_INDEX] * (NUM_QUERY_TOKENS + len(prompt)) + words(caption))
        elif task.family == "blip2_t5":
            prefix, rest = prefix_split(caption)
            ids.append([IMAGE_ID] * NUM_QUERY_TOKENS + words(prefix.strip()) + [tok.eos_token_id])
            labels.append(words(rest.strip()) + [tok.eos_token_id])
        else:
            decoder_bos = task.model.config.text_config.bos_token_id
            prompt = [decoder_bos, *words(task.prompt)]
            ids.append(prompt + words(caption) + [tok.sep_token_id])
            labels.append([IGNORE_INDEX] * len(prompt) + words(caption) + [tok.sep_token_id])
    return _pad(ids, tok.pad_token_id), _pad(labels, IGNORE_INDEX)


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_loss_is_the_models_own_loss_on_hand_built_labels(tiny_setup, caption_train_samples, family):
    task = _task(tiny_setup, family)
    batch = task.collator(caption_train_samples[:2])
    captions = batch["text"]
    expected_ids, expected_labels = _expected_inputs(task, captions)
    assert torch.equal(batch["input_ids"], expected_ids)
    assert torch.equal(batch["labels"], expected_labels)
    assert torch.equal(batch["attention_mask"], (expected_ids != task.processor.tokenizer.pad_token_id).long())

    loss = task.calibration_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    reference = task.model(
        pixel_values=batch["pixel_values"],
        input_ids=expected_ids,
        attention_mask=batch["attention_mask"],
        labels=expected_labels,
    ).loss
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.parameters())


def test_opt_labels_mask_image_tokens_prompt_and_padding(tiny_setup, caption_train_samples):
    task = _task(tiny_setup, "blip2_opt")
    batch = task.collator(caption_train_samples)
    prompt_length = 1 + len(task.processor.tokenizer(task.prompt, add_special_tokens=False)["input_ids"])
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (labels[:, : NUM_QUERY_TOKENS + prompt_length] == IGNORE_INDEX).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    caption_part = labels[:, NUM_QUERY_TOKENS + prompt_length :][mask[:, NUM_QUERY_TOKENS + prompt_length :] == 1]
    assert (caption_part != IGNORE_INDEX).all()


def test_prefix_lm_split_is_deterministic_and_within_half_the_caption():
    captions = ["a dog runs on the green grass", "two cats", "x", "a man riding a horse on the beach at sunset"]
    for caption in captions:
        prefix, rest = prefix_split(caption, seed=0)
        assert (prefix, rest) == prefix_split(caption, seed=0)
        assert prefix + rest == caption
        assert 1 <= len(prefix) <= max(1, len(caption) // 2)
    cuts = {len(prefix_split(captions[-1], seed=seed)[0]) for seed in range(20)}
    assert len(cuts) > 1  # the seed matters


def test_flant5_calibration_batches_are_reproducible(tiny_setup, caption_train_samples):
    task = _task(tiny_setup, "blip2_t5")
    assert task.prefix_lm
    first, second = task.collator(caption_train_samples), task.collator(caption_train_samples)
    assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["labels"], second["labels"])


def test_blip2_prompt_encoding_matches_blip2processor(tiny_setup, images):
    task = _task(tiny_setup, "blip2_opt")
    prompts = ["a photo of", "a photo of a dog"]
    ours = task.collator.encoder.prompt_inputs(prompts)
    processor = Blip2Processor(
        task.processor.image_processor, task.processor.tokenizer, num_query_tokens=NUM_QUERY_TOKENS
    )
    theirs = processor(images=images[:2], text=prompts, padding="longest", padding_side="left", return_tensors="pt")
    assert torch.equal(ours["prompt_input_ids"], theirs["input_ids"])
    assert torch.equal(ours["prompt_attention_mask"], theirs["attention_mask"])
    pixels = theirs["pixel_values"]
    assert torch.equal(task.collator.encoder.pixel_values([{"image": image} for image in images[:2]]), pixels)
    assert torch.equal(task.collator.encoder.pixel_values([{"pixel_values": row} for row in pixels]), pixels)


def test_collator_batches_evaluation_samples_and_pickles(tiny_setup, caption_eval_samples):
    task = _task(tiny_setup, "blip")
    collator = pickle.loads(pickle.dumps(task.collator))
    batch = collator(caption_eval_samples)
    assert set(batch) == {"pixel_values", "prompt_input_ids", "prompt_attention_mask", "image_id", "references"}
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["image_id"] == [0, 1, 2]
    assert batch["references"] == [sample["references"] for sample in caption_eval_samples]
    assert torch.equal(batch["prompt_input_ids"], task.collator(caption_eval_samples)["prompt_input_ids"])


def test_collator_rejects_a_mix_of_training_and_evaluation_samples(
    tiny_setup, caption_train_samples, caption_eval_samples
):
    task = _task(tiny_setup, "blip")
    with pytest.raises(ValueError, match="must all be training samples"):
        task.collator([caption_train_samples[0], caption_eval_samples[1]])


@pytest.mark.parametrize("family", ["blip2_opt", "blip"])
def test_generated_captions_hold_only_new_tokens(tiny_setup, caption_eval_samples, family):
    task = _task(tiny_setup, family, num_beams=1, max_new_tokens=2, min_new_tokens=2).eval()
    captions = task.generate(task.collator(caption_eval_samples[:2]))
    assert len(captions) == 2
    # two new word pieces, at most two words: the prompt ("a photo of" / "a picture of") is not echoed
    assert all(len(caption.split()) <= 2 for caption in captions)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_run_and_change_the_weights(tiny_setup, trainer_factory, caption_train_samples, family):
    task = _task(tiny_setup, family)
    trainer = trainer_factory(max_steps=2)
    changed = fit_changed_weights(task, trainer, caption_train_samples)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert changed


def test_validation_logs_caption_scores(tiny_setup, trainer_factory, caption_eval_samples):
    task = _task(tiny_setup, "blip2_opt")
    loader = DataLoader(caption_eval_samples, batch_size=2, collate_fn=task.collator)
    (metrics,) = trainer_factory().validate(task, dataloaders=loader, verbose=False)
    for key in ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider"):
        assert f"val/{key}" in metrics
    assert task.scores["val"].update_count == 0  # reset for the next epoch


def test_predict_returns_captions_with_image_ids(tiny_setup, trainer_factory, images):
    task = _task(tiny_setup, "blip2_t5")
    samples = [{"image": image, "image_id": f"img{i}"} for i, image in enumerate(images)]
    loader = DataLoader(samples, batch_size=2, collate_fn=task.collator)
    predictions = [row for batch in trainer_factory().predict(task, dataloaders=loader) for row in batch]
    assert [row["image_id"] for row in predictions] == ["img0", "img1", "img2"]
    assert all(isinstance(row["caption"], str) for row in predictions)


def test_pruning_callback_prunes_the_task_model(
    tiny_setup, trainer_factory, datamodule_factory, caption_train_samples, caption_eval_samples
):
    task = _task(tiny_setup, "blip2_t5")
    pruning = ECoFLaPPruning(sparsity=0.5, importance="uniform", fine_samples=2, stages=["predict"])
    datamodule = datamodule_factory(caption_train_samples, caption_eval_samples)
    predictions = trainer_factory(callbacks=[pruning]).predict(task, datamodule=datamodule)
    assert sum(len(batch) for batch in predictions) == len(caption_eval_samples)
    assert pruning.result.overall_sparsity == pytest.approx(0.5, abs=0.02)
    for name, mask in pruning.result.masks.items():
        assert (task.model.get_parameter(name)[~mask] == 0).all(), name


@pytest.mark.parametrize("family", ["blip2_opt", "blip"])
def test_from_pretrained_directory_round_trip(tiny_setup, tmp_path, caption_train_samples, family):
    task = _task(tiny_setup, family)
    task.model.save_pretrained(tmp_path)
    task.processor.save_pretrained(tmp_path)
    loaded = CaptioningTask(pretrained=str(tmp_path), num_beams=2, max_new_tokens=3, min_new_tokens=1)
    assert loaded.architecture == task.architecture and loaded.family == family
    for (name, theirs), (_, ours) in zip(
        loaded.model.state_dict().items(), task.model.state_dict().items(), strict=True
    ):
        assert torch.equal(theirs, ours), name
    batch, loaded_batch = task.collator(caption_train_samples), loaded.collator(caption_train_samples)
    for key in ("pixel_values", "input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], loaded_batch[key]), key
    task.eval(), loaded.eval()
    torch.testing.assert_close(loaded.calibration_loss(loaded_batch), task.calibration_loss(batch))


def test_errors_name_the_argument(tiny_setup, tmp_path):
    config, tokenizer = tiny_setup("blip")
    with pytest.raises(ValueError, match="`tokenizer` must be given with `model_config`"):
        CaptioningTask(model_config=config)
    with pytest.raises(ValueError, match="Exactly one of `pretrained` and `model_config`"):
        CaptioningTask()
    with pytest.raises(ValueError, match="`architecture` is 'blip2' but the model's model_type is 'blip'"):
        CaptioningTask(model_config=config, tokenizer=tokenizer, architecture="blip2")
    with pytest.raises(ValueError, match="`min_new_tokens` must be in"):
        CaptioningTask(model_config=config, tokenizer=tokenizer, max_new_tokens=3, min_new_tokens=5)
    small = {**config, "text_config": {**config["text_config"], "vocab_size": 10}}
    with pytest.raises(ValueError, match="`tokenizer` has .* tokens, more than the model's text vocabulary"):
        CaptioningTask(model_config=small, tokenizer=tokenizer)
    vilt_config, _ = tiny_setup("vilt")
    with pytest.raises(ValueError, match="`architecture` could not be inferred"):
        CaptioningTask(model_config=vilt_config, tokenizer=tokenizer)
