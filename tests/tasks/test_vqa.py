"""VQATask: BLIP-2 (OPT, FlanT5), BLIP and ViLT with tiny random models: batches, losses, training, accuracy,
the official results file of unannotated splits, predictions."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.models.tokenizers import IMAGE_ID
from ecoflap_pl.tasks.labels import IGNORE_INDEX
from ecoflap_pl.tasks.vqa import VQATask
from ecoflap_pl.tasks.vqa_heads import blip_generate, soft_scores
from tests.tasks.task_helpers import fit_changed_weights, validate_once_twice_and_on_two_processes

FAMILIES = ("blip2_opt", "blip2_t5", "blip", "vilt")
ANSWER_LIST = ["red", "blue", "two", "one", "yes", "no"]
NUM_QUERY_TOKENS = 4  # tiny_config's default


def _task(tiny_setup, family: str, **kwargs) -> VQATask:  # noqa: ANN001, ANN003
    config, tokenizer = tiny_setup(family, num_labels=len(ANSWER_LIST)) if family == "vilt" else tiny_setup(family)
    torch.manual_seed(0)
    options = {"num_beams": 2, "max_new_tokens": 3, "learning_rate": 1e-3}
    if family == "vilt":
        options["answer_list"] = ANSWER_LIST
    options.update(kwargs)
    return VQATask(model_config=config, tokenizer=tokenizer, **options)


def _words(task: VQATask, text: str) -> list[int]:
    return task.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_soft_scores_follow_the_official_count_rule():
    label2id = {answer: i for i, answer in enumerate(ANSWER_LIST)}
    answers = ["red"] * 7 + ["blue"] * 2 + ["green"]
    assert soft_scores(answers, label2id) == {0: 1.0, 1: pytest.approx(2 / 3)}
    assert soft_scores(["Two", "2", "two."], {"2": 0}) == {0: 1.0}  # normalised as the official evaluation
    assert soft_scores(["one"], label2id) == {3: pytest.approx(1 / 3)}


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_loss_is_the_models_own_loss_on_hand_built_labels(tiny_setup, vqa_samples, family):
    task = _task(tiny_setup, family)
    samples = vqa_samples[:2]
    batch = task.collator(samples)
    tok = task.processor.tokenizer
    model = task.model
    if family == "blip2_opt":
        rows, label_rows = [], []
        for sample in samples:
            prompt = [tok.bos_token_id, *_words(task, task.prompt.format(sample["question"]))]
            rows.append([IMAGE_ID] * NUM_QUERY_TOKENS + prompt + _words(task, sample["answer"]))
            label_rows.append([IGNORE_INDEX] * (NUM_QUERY_TOKENS + len(prompt)) + _words(task, sample["answer"]))
        width = max(map(len, rows))
        ids = torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in rows])
        labels = torch.tensor([row + [IGNORE_INDEX] * (width - len(row)) for row in label_rows])
        assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["labels"], labels)
        reference = model(
            pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=batch["attention_mask"], labels=labels
        ).loss
    elif family == "blip2_t5":
        answers = [_words(task, sample["answer"]) + [tok.eos_token_id] for sample in samples]
        width = max(map(len, answers))
        labels = torch.tensor([row + [IGNORE_INDEX] * (width - len(row)) for row in answers])
        assert torch.equal(batch["labels"], labels)
        assert (batch["input_ids"][:, :NUM_QUERY_TOKENS] == IMAGE_ID).all()
        reference = model(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
        ).loss
    elif family == "blip":
        bos = model.config.text_config.bos_token_id
        answers = [[bos, *_words(task, sample["answer"]), tok.sep_token_id] for sample in samples]
        width = max(map(len, answers))
        decoder_ids = torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in answers])
        labels = decoder_ids.masked_fill(decoder_ids == tok.pad_token_id, IGNORE_INDEX)
        assert torch.equal(batch["decoder_input_ids"], decoder_ids) and torch.equal(batch["labels"], labels)
        reference = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=(decoder_ids != tok.pad_token_id).long(),
            labels=labels,
        ).loss
    else:
        scores = torch.zeros(2, len(ANSWER_LIST))
        scores[0, ANSWER_LIST.index("red")], scores[0, ANSWER_LIST.index("blue")] = 1.0, 1.0
        scores[1, ANSWER_LIST.index("two")], scores[1, ANSWER_LIST.index("one")] = 1.0, 1 / 3
        torch.testing.assert_close(batch["labels"], scores)
        logits = model(
            **{
                k: v
                for k, v in batch.items()
                if k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "pixel_mask")
            }
        ).logits
        reference = torch.nn.functional.binary_cross_entropy_with_logits(logits, scores) * len(ANSWER_LIST)
    loss = task.calibration_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    torch.testing.assert_close(loss, reference)


def test_opt_generation_prompts_are_left_padded_after_the_image_tokens(tiny_setup, vqa_samples):
    task = _task(tiny_setup, "blip2_opt")
    batch = task.collator(vqa_samples)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert (ids[:, :NUM_QUERY_TOKENS] == IMAGE_ID).all()
    assert (mask[:, -1] == 1).all()  # every prompt ends at the last column: generation continues from it
    lengths = mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # the questions differ in length, so some rows are padded
    for row, sample in enumerate(vqa_samples):
        text = [t for t in ids[row, NUM_QUERY_TOKENS:].tolist() if t != task.processor.tokenizer.pad_token_id]
        assert text[1:] == _words(task, task.prompt.format(sample["question"]))


def test_collator_pickles_and_skips_labels_for_unannotated_samples(tiny_setup, vqa_test_samples):
    task = _task(tiny_setup, "blip2_t5")
    collator = pickle.loads(pickle.dumps(task.collator))
    batch = collator(vqa_test_samples)
    assert "labels" not in batch and "prompt_input_ids" in batch
    assert batch["question_id"] == [1000, 1001, 1002] and batch["answers"] == [[], [], []]
    with pytest.raises(ValueError, match="must carry `labels`"):
        task.calibration_loss(batch)


def test_blip_answers_do_not_depend_on_the_other_questions_of_the_batch(tiny_setup, vqa_samples):
    task = _task(tiny_setup, "blip", num_beams=1, max_new_tokens=3).eval()
    alone = task.collator(vqa_samples[2:3])  # the shortest question, unpadded
    together = task.collator(vqa_samples)  # padded to the longest question
    assert task.answer(together)[2] == task.answer(alone)[0]
    options = {"num_beams": 1, "max_new_tokens": 3}
    assert torch.equal(
        blip_generate(task.model, together, **options)[2], blip_generate(task.model, alone, **options)[0]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_run_and_change_the_weights(tiny_setup, trainer_factory, vqa_samples, family):
    task = _task(tiny_setup, family)
    trainer = trainer_factory(max_steps=2)
    changed = fit_changed_weights(task, trainer, vqa_samples)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert changed


@pytest.mark.parametrize("family", ["blip2_opt", "vilt"])
def test_validation_logs_overall_and_per_type_accuracy(tiny_setup, trainer_factory, vqa_samples, family):
    task = _task(tiny_setup, family)
    loader = DataLoader(vqa_samples, batch_size=2, collate_fn=task.collator)
    (metrics,) = trainer_factory().validate(task, dataloaders=loader, verbose=False)
    assert {"val/accuracy", "val/accuracy_yes_no", "val/accuracy_number", "val/accuracy_other"} <= set(metrics)
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    assert "val" not in task.results_paths  # annotated: scored, no results file


@pytest.mark.distributed
def test_accuracy_under_two_process_ddp_equals_one_process(tiny_setup, trainer_factory, vqa_samples):
    """5 questions on 2 ranks: the DistributedSampler repeats question 1000 on rank 1, which is scored once."""
    task = _task(tiny_setup, "vilt")
    samples = [{**vqa_samples[i % 3], "question_id": 1000 + i} for i in range(5)]
    with torch.no_grad():
        predicted = task.eval().answer(task.collator(samples))
    # human answers from the model's own answers: question 0 scores 1; the split (1 + 0 + 1 + 0.6 + 0) / 5
    for sample, prediction, matching in zip(samples, predicted, (10, 0, 10, 2, 0), strict=True):
        other = next(answer for answer in ANSWER_LIST if answer != prediction)
        sample["answers"] = [prediction] * matching + [other] * (10 - matching)
        sample["answer"] = sample["answers"][0]
    single, repeat_counted, distributed = validate_once_twice_and_on_two_processes(
        task, samples, "question_id", trainer_factory
    )
    assert single["val/accuracy"] == pytest.approx(2.6 / 5)
    assert repeat_counted["val/accuracy"] == pytest.approx(3.6 / 6)
    per_type = {key: value for key, value in single.items() if key.startswith("val/accuracy")}
    assert {key: distributed[key] for key in per_type} == per_type


@pytest.mark.distributed
def test_a_rank_without_annotated_questions_under_ddp(tiny_setup, trainer_factory, vqa_samples, tmp_path):
    """Questions 0 and 2 annotated, 1 and 3 not: the DistributedSampler gives rank 1 only unannotated ones. Each rank
    decided alone whether to compute the accuracy (a gather across ranks), so rank 1 skipped the gather rank 0 waited
    in."""
    task = _task(tiny_setup, "vilt")
    task.results_dir = str(tmp_path / "results")
    samples = [{**vqa_samples[i % 3], "question_id": 1000 + i} for i in range(4)]
    for i in (1, 3):
        samples[i] = {**samples[i], "answers": [], "answer_type": "", "answer": ""}
    loader = DataLoader(samples, batch_size=2, collate_fn=task.collator)
    single = trainer_factory().validate(task, dataloaders=loader, verbose=False)[0]
    trainer = trainer_factory(strategy="ddp_spawn", devices=2, use_distributed_sampler=True)
    distributed = trainer.validate(task, dataloaders=loader, verbose=False)[0]
    assert set(single) == set(distributed) >= {"val/accuracy"}
    assert distributed == pytest.approx(single)
    written = json.loads((tmp_path / "results" / "vqa_val_results.json").read_text(encoding="utf-8"))
    assert sorted(entry["question_id"] for entry in written) == [1001, 1003]


def test_unannotated_test_split_writes_the_official_results_file(
    tiny_setup, trainer_factory, vqa_test_samples, tmp_path
):
    task = _task(tiny_setup, "blip2_t5", results_dir=str(tmp_path))
    loader = DataLoader(vqa_test_samples[::-1], batch_size=2, collate_fn=task.collator)
    (metrics,) = trainer_factory().test(task, dataloaders=loader, verbose=False)
    assert not any(key.startswith("test/accuracy") for key in metrics)
    path = tmp_path / "vqa_test_results.json"
    assert task.results_paths["test"] == path
    results = json.loads(path.read_text())
    assert [row["question_id"] for row in results] == [1000, 1001, 1002]
    assert all(set(row) == {"question_id", "answer"} and isinstance(row["answer"], str) for row in results)


def test_predict_returns_answers_with_question_ids(tiny_setup, trainer_factory, vqa_test_samples):
    task = _task(tiny_setup, "vilt")
    loader = DataLoader(vqa_test_samples, batch_size=2, collate_fn=task.collator)
    predictions = [row for batch in trainer_factory().predict(task, dataloaders=loader) for row in batch]
    assert [row["question_id"] for row in predictions] == [1000, 1001, 1002]
    assert all(row["answer"] in ANSWER_LIST for row in predictions)


@pytest.mark.parametrize("family", ["blip2_opt", "blip", "vilt"])
def test_pruning_callback_prunes_the_task_model(tiny_setup, trainer_factory, datamodule_factory, vqa_samples, family):
    task = _task(tiny_setup, family)
    pruning = ECoFLaPPruning(sparsity=0.5, importance="uniform", fine_samples=2, stages=["validate"])
    datamodule = datamodule_factory(vqa_samples, vqa_samples)
    (metrics,) = trainer_factory(callbacks=[pruning]).validate(task, datamodule=datamodule, verbose=False)
    assert "val/accuracy" in metrics
    assert pruning.result.overall_sparsity == pytest.approx(0.5, abs=0.02)
    for name, mask in pruning.result.masks.items():
        assert (task.model.get_parameter(name)[~mask] == 0).all(), name


def test_from_pretrained_directory_round_trip(tiny_setup, tmp_path, vqa_samples):
    task = _task(tiny_setup, "vilt")
    task.model.save_pretrained(tmp_path)
    task.processor.save_pretrained(tmp_path)
    loaded = VQATask(pretrained=str(tmp_path))
    assert loaded.answer_list == ANSWER_LIST
    batch = loaded.collator(vqa_samples)
    torch.testing.assert_close(loaded.calibration_loss(batch), task.calibration_loss(task.collator(vqa_samples)))


def test_errors_name_the_argument(tiny_setup):
    config, tokenizer = tiny_setup("blip2_opt")
    with pytest.raises(ValueError, match="`prompt` must hold exactly one"):
        VQATask(model_config=config, tokenizer=tokenizer, prompt="Question: Short answer:")
    vilt_config, vilt_tokenizer = tiny_setup("vilt", num_labels=3)
    with pytest.raises(ValueError, match="`answer_list` must hold one answer per classifier output"):
        VQATask(model_config=vilt_config, tokenizer=vilt_tokenizer, answer_list=["yes", "no"])
    with pytest.raises(ValueError, match="ViLT VQA needs an answer vocabulary"):
        VQATask(model_config=vilt_config, tokenizer=vilt_tokenizer)
