"""SigLIP for retrieval and ImageNet zero-shot: its own sigmoid loss, prompts padded to its text length without an
attention mask (as it was trained), and both towers pruned by the callback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.models.tiny import tiny_processor
from ecoflap_pl.tasks import RetrievalTask, ZeroShotClassificationTask

CLASS_NAMES = ["dog", "bus", "cat"]
CAPTIONS = ("a dog runs on the green grass", "a red bus parked near the street", "two cats sleeping on a couch")


@pytest.fixture(scope="module")
def siglip_setup(tmp_path_factory):
    config, processor = tiny_processor("siglip", [*CAPTIONS, "a photo of a dog bus cat"] * 3)
    path = tmp_path_factory.mktemp("siglip_tokenizer")
    processor.tokenizer.save_pretrained(path)
    return config.to_dict(), str(path)


def test_retrieval_uses_siglips_own_loss_on_fixed_length_captions(siglip_setup, caption_train_samples):
    config, tokenizer = siglip_setup
    task = RetrievalTask(model_config=config, tokenizer=tokenizer)
    assert task.itm_top_k == 0 and not task.itm_loss
    batch = task.collator(caption_train_samples)
    assert batch["input_ids"].shape[1] == config["text_config"]["max_position_embeddings"]
    model = task.model
    images = F.normalize(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
    texts = F.normalize(model.get_text_features(input_ids=batch["input_ids"]).pooler_output, dim=-1)
    logits = texts @ images.T * model.logit_scale.exp() + model.logit_bias
    labels = 2 * torch.eye(len(caption_train_samples)) - 1
    expected = -F.logsigmoid(labels * logits).sum() / len(caption_train_samples)
    torch.testing.assert_close(task.calibration_loss(batch), expected)


def test_retrieval_callback_prunes_both_towers(
    siglip_setup, trainer_factory, datamodule_factory, caption_train_samples, caption_eval_samples
):
    config, tokenizer = siglip_setup
    task = RetrievalTask(model_config=config, tokenizer=tokenizer)
    pruning = ECoFLaPPruning(
        sparsity=0.5, importance="zeroth_order", coarse_samples=2, fine_samples=2, stages=["validate"], progress=False
    )
    datamodule = datamodule_factory(caption_train_samples, caption_eval_samples)
    (metrics,) = trainer_factory(callbacks=[pruning]).validate(task, datamodule=datamodule, verbose=False)
    assert "val/r_mean" in metrics
    assert set(pruning.result.towers) == {"vision_model.encoder.layers", "text_model.encoder.layers"}
    assert pruning.result.overall_sparsity == pytest.approx(0.5, abs=0.03)
    assert not [name for name in pruning.result.masks if "head" in name]  # the attention-pooling head stays dense


def test_zero_shot_classification_with_siglip(siglip_setup):
    config, tokenizer = siglip_setup
    task = ZeroShotClassificationTask(model_config=config, tokenizer=tokenizer, class_names=CLASS_NAMES)
    assert task.model.config.model_type == "siglip"
    assert task.data_config["mean"] == (0.5, 0.5, 0.5) and "attention_mask" not in task._prompts
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    loss = task.calibration_loss({"pixel_values": pixels, "labels": torch.tensor([0, 2])})
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert task.model.text_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0  # the text tower is in the loss
