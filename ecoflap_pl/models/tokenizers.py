"""Tokenizers trained offline with the ``tokenizers`` library, for tiny test models and the demo.

Real runs load the tokenizer that ships with a ``from_pretrained`` model. Tests and the demo cannot reach the model
hub, so they train a small WordPiece vocabulary on their own text; the special tokens get fixed ids so that tiny model
configs can name them without looking the tokenizer up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<s>", "<image>", "[CLS]", "[SEP]", "[MASK]")
"""Special tokens in id order: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, ``<s>`` = 3, ``<image>`` = 4, ..."""
PAD_ID, EOS_ID, UNK_ID, BOS_ID, IMAGE_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))

QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
"""The special tokens Qwen2-VL and Qwen2.5-VL processors put around and in place of an image (and a video)."""

TEMPLATES = ("none", "bos", "eos", "bos_eos", "cls_sep")
"""How a single sequence is wrapped: as OPT/LLaMA (``bos``), T5 (``eos``), CLIP (``bos_eos``) or BERT (``cls_sep``)."""


def _post_processor(template: str) -> processors.TemplateProcessing | None:
    wrap = {"bos": ("<s>", None), "eos": (None, "</s>"), "bos_eos": ("<s>", "</s>"), "cls_sep": ("[CLS]", "[SEP]")}
    if template == "none":
        return None
    first, last = wrap[template]
    single = " ".join(token for token in (first, "$A", last) if token)
    pair = " ".join(token for token in (first, "$A", last, "$B:1", last and f"{last}:1") if token)
    used = [token for token in (first, last) if token]
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(token, SPECIAL_TOKENS.index(token)) for token in used]
    )


def _vocabulary(
    texts: Iterable[str], normalizer: normalizers.Normalizer, pre_tokenizer: pre_tokenizers.PreTokenizer, size: int
) -> dict[str, int]:
    """Special tokens, every character (word-initial and ``##`` continuation), then the most frequent words.

    Built here rather than by ``tokenizers``' WordPiece trainer, whose ties between equally frequent merges follow
    hash-map order and so change from run to run: the same corpus must always give the same ids.
    """
    words: Counter[str] = Counter()
    for text in texts:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({character for word in words for character in word})
    tokens = [*SPECIAL_TOKENS, *characters, *(f"##{character}" for character in characters)]
    if len(tokens) > size:
        raise ValueError(
            f"`vocab_size` must hold the {len(tokens)} special and character tokens of the corpus, got {size!r}."
        )
    known = set(tokens)
    ranked = sorted((word for word in words if word not in known), key=lambda word: (-words[word], word))
    tokens += ranked[: size - len(tokens)]
    return {token: index for index, token in enumerate(tokens)}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, template: str = "none", model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer for ``texts``: deterministic, the same corpus always gives the same ids.

    Args:
        texts: the corpus (captions, questions, answers, ...).
        vocab_size: maximum vocabulary size, special tokens included.
        template: how encoded sequences are wrapped, one of :data:`TEMPLATES`.
        model_max_length: the length ``truncation=True`` cuts to.

    Returns:
        A fast tokenizer with the special tokens of :data:`SPECIAL_TOKENS` at fixed ids; save it with
        ``save_pretrained(dir)`` and load it back with ``AutoTokenizer.from_pretrained(dir)``.
    """
    if template not in TEMPLATES:
        raise ValueError(f"`template` must be one of {TEMPLATES}, got {template!r}.")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"`vocab_size` must be > {len(SPECIAL_TOKENS)}, got {vocab_size!r}.")
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocabulary = _vocabulary(texts, normalizer, pre_tokenizer, vocab_size)
    tokenizer = Tokenizer(models.WordPiece(vocabulary, unk_token="<unk>"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # matched whole, before pre-tokenization; ids unchanged
    post_processor = _post_processor(template)
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def add_qwen_vision_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Append :data:`QWEN_VISION_TOKENS` as special tokens (the last ids; tiny Qwen configs expect them there)."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_VISION_TOKENS)})
    return tokenizer
