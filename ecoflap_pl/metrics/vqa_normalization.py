"""The answer normalisation of the official VQA evaluation script (GT-Vision-Lab/VQA, ``vqaEval.py``).

The version followed is the one LAVIS (and so ECoFLaP's numbers) ships: GT-Vision-Lab's script as it was from
October 2016 (ASCII apostrophes in the contractions) until March 2021. Its tables are unchanged since, but its
``evaluate()`` loop was changed then (commit ``a013f00``): the prediction is normalised only when the human answers
disagree, and those answers then also get ``processDigitArticle``. That later loop scores ``"two"`` against ten
``"2"`` as 0 where this one (and LAVIS) gives 1; see ``vqa.py`` for the loop followed here.

The tables are written out here by hand because no maintained library ships them: the official script is not a
package (it is copied into LAVIS, BLIP, OFA, ... each with small edits), and torchmetrics / evaluate have no VQA
accuracy. They are kept exactly as the official script has them, quirks included, so scores compare with
published numbers:

- ``PERIOD_STRIP``: ``(?!<=\\d)`` is a typo'd look-behind, i.e. a look-ahead that never matches; the effect is
  "drop a period unless a digit follows it" (``"3.5"`` and ``".5"`` keep theirs, ``"end."`` loses it).
- the script passes ``re.UNICODE`` (== 32) positionally to ``re.sub``, where it is ``count``: at most 32
  periods are removed.
- punctuation is deleted when it touches a space anywhere in the answer (``"red, white"`` -> ``"red white"``) or
  when the answer has a digit-comma-digit (``"1,000"`` -> ``"1000"``); otherwise it becomes a space
  (``"t-shirt"`` -> ``"t shirt"``). ``'`` ``:`` ``*`` ``#`` ``&`` are not in the list and stay.
- number words: only ``none`` and ``zero``..``ten``; the contraction keys with capitals (``"Im"``, ``"Ive"``)
  never match, since the text is lower-cased first.
"""

from __future__ import annotations

import re

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # see the module docstring


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: delete or space out punctuation, drop periods not before a digit."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, drop articles, restore contractions."""
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """Normalise a predicted answer as the official script does (newlines/tabs, strip, punctuation, digits...).

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("The T-shirt")
    't shirt'
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))
