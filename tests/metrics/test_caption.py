"""CaptionScores against pycocoevalcap's tokenizer and scorers called directly on the same data."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from ecoflap_pl.metrics import CAPTION_SCORE_KEYS, CaptionScores, caption_scores
from ecoflap_pl.metrics.caption import _missing_spice_models, _without_tokenizer_summary
from tests.metrics.metric_data import CAPTION_IDS, CAPTION_PREDICTIONS, CAPTION_REFERENCES


def _pycocoevalcap_directly() -> dict[str, float]:
    """What COCOEvalCap.evaluate() does, minus SPICE (which needs a download)."""
    tokenizer = PTBTokenizer()
    # "\r" -> " " by hand: given to pycocoevalcap as is, it splits the caption in two and shifts the later ones.
    pairs = zip(CAPTION_IDS, CAPTION_REFERENCES, strict=True)
    gts = {i: [{"caption": ref.replace("\r", " ")} for ref in refs] for i, refs in pairs}
    res = {i: [{"caption": pred}] for i, pred in zip(CAPTION_IDS, CAPTION_PREDICTIONS, strict=True)}
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        **{f"bleu_{n}": b for n, b in enumerate(bleu, start=1)},
        "meteor": Meteor().compute_score(gts, res)[0],
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }


def test_scores_equal_pycocoevalcap_called_directly(caption_scores_single: dict[str, float]) -> None:
    # the fixture fed the data in two batches plus a repeated id, which must be scored once
    expected = _pycocoevalcap_directly()
    assert tuple(caption_scores_single) == CAPTION_SCORE_KEYS
    assert all(isinstance(value, float) for value in caption_scores_single.values())
    assert caption_scores_single == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert 0 < caption_scores_single["bleu_4"] < caption_scores_single["bleu_1"] < 1
    assert caption_scores_single["cider"] > 0


@pytest.mark.skipif(not _missing_spice_models(), reason="SPICE's Stanford CoreNLP jars are present here")
def test_spice_without_its_models_raises_at_construction() -> None:
    with pytest.raises(RuntimeError, match=r"`spice=True` needs the Stanford CoreNLP jars.*HINT"):
        CaptionScores(spice=True)
    with pytest.raises(RuntimeError, match=r"`spice=True`"):
        caption_scores(["a dog"], [["a dog"]], spice=True)


def test_spice_must_be_bool() -> None:
    with pytest.raises(TypeError, match="`spice` must be a bool"):
        CaptionScores(spice="yes")


@pytest.mark.parametrize(
    ("predictions", "references", "ids", "error", "match"),
    [
        ("a dog", [["a dog"]], None, TypeError, "`predictions` must be a sequence of strings"),
        (["a dog", "a cat"], [["a dog"]], None, ValueError, r"one list of reference captions per prediction \(2\)"),
        (["a dog"], [[]], None, ValueError, "non-empty list of strings per sample"),
        (["a dog"], ["a dog"], None, ValueError, "HINT: a single caption still goes in a list"),
        (["a dog"], [["a dog"]], [1, 2], ValueError, r"`ids` must have one id per sample \(1\), got 2"),
        (["a dog"], [["a dog"]], [1.5], ValueError, "`ids` must hold ints or non-empty strings"),
    ],
)
def test_update_rejects_bad_input(predictions, references, ids, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        CaptionScores().update(predictions, references, ids=ids)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_compute_without_samples_raises() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        CaptionScores().compute()


@pytest.mark.parametrize("references", [[[""]], [["", " "], ["..."]]])
def test_a_corpus_of_empty_references_is_named(references: list[list[str]]) -> None:
    """References that are all empty once PTB-tokenised (blank, or punctuation only) ended in pycocoevalcap's
    "max() arg is an empty sequence" from ROUGE-L / CIDEr."""
    predictions = ["a dog", "a cat"][: len(references)]
    with pytest.raises(ValueError, match=r"Every reference caption of the \d samples is empty once PTB-tokenised"):
        caption_scores(predictions, references)
    # one empty reference beside real ones is scored as pycocoevalcap scores it
    assert caption_scores(["a dog", "a cat"], [["a dog"], [""]])["bleu_1"] > 0


def test_the_tokenizer_s_summary_line_is_not_printed(capfd: pytest.CaptureFixture[str]) -> None:
    """Stanford's PTB tokenizer printed "PTBTokenizer tokenized N tokens at R tokens per second." to standard error
    twice per evaluation (four lines in the captioning demo's first run); anything else written there is kept."""
    caption_scores(["a dog runs"], [["a dog running", "a brown dog"]])
    assert "PTBTokenizer" not in capfd.readouterr().err
    with _without_tokenizer_summary():
        os.write(2, b"PTBTokenizer tokenized 3 tokens at 10.0 tokens per second.\nException in thread main\n")
        print("a Python warning", file=sys.stderr)
    # (pytest's capfd points sys.stderr at its capture directly, so the two lines' order is not the terminal's)
    assert sorted(capfd.readouterr().err.splitlines()) == ["Exception in thread main", "a Python warning"]


def _open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open file descriptors through /proc")
def test_scores_without_a_writable_temporary_folder_leave_no_descriptor_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quieting the tokenizer needs a temporary file: where none can be made (an unwritable TMPDIR) the scores failed
    with a FileNotFoundError and left a duplicate of standard error open on every call."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    before = _open_descriptors()
    with _without_tokenizer_summary():
        pass
    assert _open_descriptors() == before
    assert caption_scores(["a dog runs"], [["a dog running"]])["bleu_1"] > 0


def test_scores_without_sys_stderr(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """``sys.stderr`` is None under pythonw and in some services: the scores failed with "'NoneType' object has no
    attribute 'flush'"; the tokenizer's other output still reaches file descriptor 2."""
    monkeypatch.setattr(sys, "stderr", None)
    assert caption_scores(["a dog runs"], [["a dog running"]])["bleu_1"] > 0
    with _without_tokenizer_summary():
        os.write(2, b"PTBTokenizer tokenized 3 tokens at 10.0 tokens per second.\nException in thread main\n")
    assert capfd.readouterr().err == "Exception in thread main\n"


def test_two_threads_quieting_the_tokenizer_at_once_give_standard_error_back() -> None:
    """Two threads scoring at once, the first done first: it put standard error back, then the second put back what
    it had saved, the first one's temporary file, so everything written to standard error afterwards was lost."""
    original, saved = os.fstat(2), os.dup(2)
    first_inside, second_inside = threading.Event(), threading.Event()

    def first() -> None:
        with _without_tokenizer_summary():
            first_inside.set()
            second_inside.wait(timeout=1)  # redirections that cannot overlap never see the second one inside

    def second() -> None:
        first_inside.wait(timeout=10)
        with _without_tokenizer_summary():
            second_inside.set()
            time.sleep(0.2)  # the first thread leaves first

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        now = os.fstat(2)
        assert (now.st_dev, now.st_ino) == (original.st_dev, original.st_ino)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
