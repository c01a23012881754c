"""VQAAccuracy: the official normalisation and 10-answer rule on hand-worked cases, and the results file."""

from __future__ import annotations

import json
import random

import pytest

from ecoflap_pl.metrics import VQAAccuracy, normalize_answer, vqa_accuracy, vqa_score, write_vqa_results
from ecoflap_pl.metrics.vqa_normalization import process_digit_article, process_punctuation
from tests.metrics.metric_data import VQA_EXPECTED, VQA_QUESTIONS


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        # punctuation touching a space is deleted, otherwise it becomes a space
        ("red, white", "red white"),
        ("t-shirt", "t shirt"),
        ("t - shirt", "t shirt"),
        ("(left)", "left"),
        ("yes!", "yes"),
        ("black/white", "black white"),
        # a digit-comma-digit anywhere: every listed mark is deleted
        ("1,000", "1000"),
        ("1,000 (approx)", "1000 approx"),
        # periods go unless a digit follows; apostrophes and colons are not in the official list
        ("yes.", "yes"),
        ("3.5", "3.5"),
        (".5", ".5"),
        ("u.s.a.", "usa"),
        ("10:30", "10:30"),
        # number words zero..ten and "none"; nothing beyond ten
        ("Two", "2"),
        ("ten", "10"),
        ("none", "0"),
        ("eleven", "eleven"),
        # articles dropped as whole words only
        ("a dog", "dog"),
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("another", "another"),
        # contractions restored after lower-casing; the official keys with capitals ("Im") can never match
        ("dont", "don't"),
        ("Isnt", "isn't"),
        ("Im", "im"),
        # whitespace: newlines and tabs to spaces, runs collapsed, stripped
        ("  two\tdogs\n", "2 dogs"),
    ],
)
def test_normalize_answer_matches_the_official_rules(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_period_strip_removes_at_most_32_periods_as_the_official_call_does() -> None:
    # the official script passes re.UNICODE (32) as re.sub's count
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # m of the 10 human answers equal the prediction. For each human answer i, the matches among the OTHER 9
        # are m - 1 if i matches, else m; its credit is min(1, that / 3); the score averages the 10 credits.
        (0, 0.0),  # 10 * min(1, 0/3) = 0
        (1, 0.3),  # (1 * 0/3 + 9 * 1/3) / 10 = 3/10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4 * min(1, 3/3) + 6 * min(1, 4/3)) / 10 = 1
        (10, 1.0),
    ],
)
def test_ten_choose_nine_averaging(matching: int, expected: float) -> None:
    answers = ["yes"] * matching + ["no"] * (10 - matching)
    assert vqa_score("yes", answers) == pytest.approx(expected, abs=1e-15)


def test_human_answers_are_processed_as_the_official_script_does() -> None:
    # the human answers get only processPunctuation, and only when they disagree: the released annotations are
    # already normalised. So identical raw answers "Yes" never match the prediction "yes" ...
    assert vqa_score("yes", ["Yes"] * 10) == 0.0
    # ... while disagreeing ones are punctuation-processed: "t-shirt" -> "t shirt" on both sides
    assert vqa_score("t shirt", ["t-shirt"] * 4 + ["shirt"] * 6) == 1.0


def test_follows_the_loop_lavis_ships_not_the_2021_rewrite() -> None:
    # LAVIS's copy (GT-Vision-Lab's loop before March 2021) always fully normalises the prediction: "Two" -> "2"
    # matches ten agreeing "2" (the 2021 rewrite leaves the prediction raw here and scores 0) ...
    assert vqa_score("Two", ["2"] * 10) == 1.0
    # ... and never digit/article-processes the human answers: "the dog" stays "the dog", so the prediction "dog"
    # (normalised: "dog") matches none of them (the 2021 rewrite makes them "dog" and scores 1).
    assert vqa_score("dog", ["the dog"] * 4 + ["cat"] * 6) == 0.0


def test_per_answer_type_accuracy_on_hand_worked_questions() -> None:
    # VQA_QUESTIONS, worked out: "yes" vs 10 x "yes" -> 1; "No" -> "no", 2 of 10 match -> 0.6;
    # "two" -> "2", 3 of 10 match -> 0.9; "the dog" -> "dog" vs 10 x "dog" -> 1;
    # "t-shirt" -> "t shirt", 1 of 10 matches -> 0.3; "dont know" -> "don't know", 5 of 10 match -> 1.
    predictions, answers, types = (list(column) for column in zip(*VQA_QUESTIONS, strict=True))
    metric = VQAAccuracy()
    metric.update(predictions[:4], answers[:4], types[:4])
    metric.update(predictions[4:], answers[4:], types[4:])
    result = metric.compute()
    assert result == pytest.approx(VQA_EXPECTED, abs=1e-15)
    assert list(result) == ["accuracy", "accuracy_yes_no", "accuracy_number", "accuracy_other"]
    assert vqa_accuracy(predictions, answers, types) == result


def test_without_answer_types_only_the_overall_accuracy_is_reported() -> None:
    predictions, answers, _ = zip(*VQA_QUESTIONS, strict=True)
    assert vqa_accuracy(predictions, answers) == pytest.approx({"accuracy": VQA_EXPECTED["accuracy"]})


def test_a_repeated_question_id_is_scored_once() -> None:
    # a padding DistributedSampler repeats questions; without ids the repeat counts again (the sum of old)
    predictions, answers, types = (list(column) for column in zip(*VQA_QUESTIONS, strict=True))
    ids = [262148000 + i for i in range(len(predictions))]
    metric = VQAAccuracy()
    metric.update(predictions, answers, types, question_ids=ids)
    metric.update(predictions[4:5], answers[4:5], types[4:5], question_ids=ids[4:5])  # "t-shirt", scored 0.3
    assert metric.compute() == pytest.approx(VQA_EXPECTED, abs=1e-15)
    assert vqa_accuracy(predictions + predictions[4:5], answers + answers[4:5], types + types[4:5], ids + ids[4:5]) == (
        pytest.approx(VQA_EXPECTED, abs=1e-15)
    )
    repeated = vqa_accuracy(predictions + predictions[4:5], answers + answers[4:5], types + types[4:5])
    assert repeated["accuracy"] == pytest.approx((6 * VQA_EXPECTED["accuracy"] + 0.3) / 7, abs=1e-15)
    # a question without an id (None) is never dropped
    with_none = vqa_accuracy(predictions[4:5] * 2, answers[4:5] * 2, question_ids=[None, ids[4]])
    assert with_none == pytest.approx({"accuracy": 0.3}, abs=1e-15)


def test_question_ids_must_name_each_question() -> None:
    with pytest.raises(ValueError, match=r"`question_ids` must have one id per sample \(1\), got 2"):
        VQAAccuracy().update(["yes"], [["yes"] * 10], question_ids=[1, 2])
    with pytest.raises(ValueError, match=r"`question_ids` must hold ints or non-empty strings .*got 1\.5"):
        vqa_accuracy(["yes"], [["yes"] * 10], question_ids=[1.5])  # type: ignore[list-item]


def _official_question_accuracy(prediction: str, answers: list[str]) -> float:
    """The official vqaEval.py loop body as LAVIS ships it, transcribed (answers as dicts with ids, removed by id)."""
    gts = [{"answer": answer, "answer_id": str(i + 1)} for i, answer in enumerate(answers)]
    res_ans = prediction.replace("\n", " ").replace("\t", " ").strip()
    res_ans = process_digit_article(process_punctuation(res_ans))
    if len(set(a["answer"] for a in gts)) > 1:
        for ans_dic in gts:
            ans_dic["answer"] = process_punctuation(ans_dic["answer"])
    gt_acc = []
    for gt_ans_datum in gts:
        other_gt_ans = [item for item in gts if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching_ans)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


def test_matches_the_official_loop_on_random_questions() -> None:
    rng = random.Random(0)
    vocab = ["two", "2", "Two.", "a dog", "dog", "dont", "don't", "t-shirt", "t shirt", "yes", "no", "1,000", "1000"]
    for _ in range(300):
        answers = [rng.choice(vocab) for _ in range(10)]
        prediction = rng.choice(vocab)
        assert vqa_score(prediction, answers) == pytest.approx(_official_question_accuracy(prediction, answers))


@pytest.mark.parametrize(
    ("answers", "types", "match"),
    [
        ([[]], None, "1 to 10 human answers per question"),
        ([["yes"] * 11], None, "1 to 10 human answers per question"),
        ([["yes"] * 10], ["boolean"], r"`answer_types` must hold values in \('yes/no', 'number', 'other'\)"),
        ([["yes"] * 10], ["yes/no", "other"], r"one type per prediction \(1\)"),
        ([["yes"] * 10] * 2, None, r"`answers` must hold one list per prediction \(1\)"),
    ],
)
def test_update_rejects_bad_input(answers, types, match) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        VQAAccuracy().update(["yes"], answers, types)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_compute_without_questions_raises() -> None:
    with pytest.raises(ValueError, match="at least one question"):
        VQAAccuracy().compute()


def test_results_file_is_the_official_format_each_question_once(tmp_path) -> None:  # noqa: ANN001
    path = write_vqa_results(tmp_path / "out" / "vqa_test.json", [30, 10, 20, 10], ["two", "yes", "red", "no"])
    assert json.loads(path.read_text()) == [
        {"question_id": 10, "answer": "yes"},
        {"question_id": 20, "answer": "red"},
        {"question_id": 30, "answer": "two"},
    ]
    with pytest.raises(ValueError, match=r"one answer per question id \(2\), got 1"):
        write_vqa_results(tmp_path / "x.json", [1, 2], ["a"])
    with pytest.raises(TypeError, match="`question_ids` must hold ints"):
        write_vqa_results(tmp_path / "x.json", ["q1"], ["a"])  # type: ignore[list-item]
