"""Training a tokenizer: WordPiece (BERT's, through Hugging Face `tokenizers`), SentencePiece (unigram or
BPE) or byte-level BPE (RoBERTa's, through `tokenizers`), saved in the folder form
`data_pipeline.tokenization.Tokenizer.load` reads back."""

from __future__ import annotations

from typing import Iterable

from data_pipeline import tokenizer_backends as backends
from data_pipeline.errors import DataError
from data_pipeline.tokenization import BYTELEVEL_SPECIAL_TOKENS, SPECIAL_TOKENS, SPM_KINDS, ByteLevelBPETokenizer, \
    SentencePieceTokenizer, WordPieceTokenizer


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DataError(f"vocab_size must be larger than {len(SPECIAL_TOKENS)}, got {vocab_size}")


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str, lowercase: bool = True) -> str:
    """Train a BERT-style WordPiece vocabulary on `texts` and save it (see `WordPieceTokenizer.save`) to
    `out_dir`; returns `out_dir`.

    The vocabulary has at most `vocab_size` entries (fewer when the corpus is too small to learn that
    many) and starts with `SPECIAL_TOKENS` at ids 0..4, then the alphabet, the "##" continuation of each
    alphabet character, and the learned pieces. The same texts give the same vocabulary in every run.
    `texts` is read once (spooled to a file under `out_dir`, removed afterwards).
    """
    _check_vocab_size(vocab_size)
    tokens = backends.train_wordpiece_tokens(texts, vocab_size, out_dir, lowercase, SPECIAL_TOKENS)
    return WordPieceTokenizer(tokens, lowercase=lowercase).save(out_dir)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str, lowercase: bool = True,
                        model_type: str = "unigram", max_sentences: int = 2_000_000) -> str:
    """Train a SentencePiece unigram or BPE model on the lines of `texts` and save it to `out_dir`.

    Special pieces get ids 0..4 (see the module docstring). At most `max_sentences` lines are used (a seeded
    random sample when there are more), which bounds the trainer's memory. Returns `out_dir`.
    """
    if model_type not in ("unigram", "bpe"):
        raise DataError(f"SentencePiece model_type must be 'unigram' or 'bpe', got {model_type!r}")
    _check_vocab_size(vocab_size)
    model = backends.train_sentencepiece_model(texts, vocab_size, lowercase, model_type, max_sentences,
                                               SPECIAL_TOKENS)
    return SentencePieceTokenizer(model).save(out_dir)


def train_bytelevel_bpe(texts: Iterable[str], vocab_size: int, out_dir: str, lowercase: bool = False) -> str:
    """Train a byte-level BPE (RoBERTa's tokenizer) on `texts` and save it to `out_dir`; returns `out_dir`.

    Ids: RoBERTa's special tokens <s>=0, <pad>=1, </s>=2, <unk>=3 and <mask>=4, the 256 byte symbols, then one
    token per learned merge. Uncased (`lowercase`) adds a Lowercase normaliser (RoBERTa itself is cased)."""
    if vocab_size < len(BYTELEVEL_SPECIAL_TOKENS) + 256 + 1:
        raise DataError(f"a byte-level BPE needs vocab_size > {len(BYTELEVEL_SPECIAL_TOKENS) + 256} (the special "
                        f"tokens and the 256 bytes), got {vocab_size}")
    vocab, merges = backends.train_bytelevel_bpe(texts, vocab_size, lowercase, BYTELEVEL_SPECIAL_TOKENS)
    cls, pad, sep, unk, mask = BYTELEVEL_SPECIAL_TOKENS
    roles = {"pad": pad, "unk": unk, "cls": cls, "sep": sep, "mask": mask}
    return ByteLevelBPETokenizer.build(vocab, merges, roles, lowercase).save(out_dir)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, out_dir: str, lowercase: bool = True) -> str:
    """Train a tokenizer of `kind` ("wordpiece", "sentencepiece-unigram", "sentencepiece-bpe", "bytelevel-bpe") into
    `out_dir`."""
    if kind == "wordpiece":
        return train_wordpiece(texts, vocab_size, out_dir, lowercase=lowercase)
    if kind in SPM_KINDS:
        return train_sentencepiece(texts, vocab_size, out_dir, lowercase=lowercase, model_type=SPM_KINDS[kind])
    if kind == "bytelevel-bpe":
        return train_bytelevel_bpe(texts, vocab_size, out_dir, lowercase=lowercase)
    raise DataError(f"unknown tokenizer {kind!r} (wordpiece, sentencepiece-unigram, sentencepiece-bpe, "
                    "bytelevel-bpe)")
