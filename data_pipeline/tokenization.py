"""WordPiece tokenization: train a BERT-style vocabulary, or load an existing `vocab.txt`.

Both paths end in one `Tokenizer` class backed by the Hugging Face `tokenizers` library (Rust, fast,
multi-threaded `encode_batch`) and configured like BERT's: BERT normaliser (lowercasing and accent
stripping when uncased), BERT pre-tokenizer (whitespace + punctuation split), WordPiece with the `##`
continuing-subword prefix. Ids are line numbers of `vocab.txt`.

A trained vocabulary starts with the five special tokens `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3,
`[MASK]`=4; a loaded one may place them anywhere (the original BERT vocab: 0, 100, 101, 102, 103), so
callers always use the `*_id` attributes.

Reproducibility: training is not bit-exact across runs with tokenizers 0.23 (huggingface/tokenizers
issue #1794: `##` tokens get ids in hash-map order, and ids break ties between equally frequent merges),
so two trainings on the same text can differ in a handful of tokens. Datasets are reproducible from a
saved vocabulary (`pretokenize --vocab`), and the manifest records `vocab_hash` to tell them apart.

(This module is not called `tokenizers.py`: that name would shadow the Hugging Face package.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, Sequence

from data_pipeline.errors import DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONFIG_FILE = "tokenizer_config.json"
# `[` and `]` are punctuation to the BERT pre-tokenizer, so no token learned from text can look like
# `[XXX]`: any vocabulary entry of that shape ([PAD], [unused17], ...) is a special token.
_SPECIAL_RE = re.compile(r"^\[[A-Za-z0-9_]+\]$")


def _build_backend(vocab: dict[str, int], lowercase: bool):
    """A `tokenizers.Tokenizer` for a WordPiece vocab, configured like BERT's (and like HF's BERT files)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, \
        pre_tokenizers, processors

    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                       max_input_chars_per_word=100))
    # strip_accents=None follows `lowercase`, as in the original BERT uncased/cased models.
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    # Registered as added tokens so that a literal "[MASK]" in text maps to its id, exactly as a Hugging
    # Face BERT tokenizer does (the equality test against transformers depends on it).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # The post-processor only matters for users of the saved tokenizer.json (e.g. a converted HF model):
    # `encode_batch` below never adds [CLS]/[SEP]; packing does that.
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return tok


class Tokenizer:
    """A WordPiece tokenizer with BERT's special tokens; see the module docstring."""

    def __init__(self, tokens: Sequence[str], lowercase: bool = True, source: str = "<memory>"):
        self._tokens = list(tokens)
        vocab = {}
        for i, t in enumerate(self._tokens):
            if t in vocab:
                raise DataError(f"{source}: duplicate token {t!r} at lines {vocab[t] + 1} and {i + 1}")
            vocab[t] = i
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise DataError(f"{source}: vocabulary lacks the special tokens {missing}")
        self._vocab = vocab
        self.lowercase = bool(lowercase)
        self._backend = _build_backend(vocab, self.lowercase)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in SPECIAL_TOKENS)
        self.special_ids = tuple(i for i, t in enumerate(self._tokens) if _SPECIAL_RE.match(t))

    @classmethod
    def load(cls, path: str, lowercase: bool | None = None) -> "Tokenizer":
        """Load from a folder holding `vocab.txt`, or from a path to a vocab file.

        `lowercase=None` reads the flag from a `tokenizer_config.json` next to the vocab (ours, or a
        Hugging Face one with `do_lower_case`), defaulting to True (uncased) when there is none.
        """
        vocab_file = os.path.join(path, "vocab.txt") if os.path.isdir(path) else path
        if not os.path.isfile(vocab_file):
            raise DataError(f"no WordPiece vocabulary at {vocab_file!r}")
        if lowercase is None:
            lowercase = True
            config_file = os.path.join(os.path.dirname(vocab_file), CONFIG_FILE)
            if os.path.isfile(config_file):
                try:
                    with open(config_file, encoding="utf-8") as f:
                        config = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{config_file}: invalid JSON ({e.msg})") from None
                lowercase = bool(config.get("lowercase", config.get("do_lower_case", True)))
        try:
            with open(vocab_file, encoding="utf-8") as f:
                tokens = [line.rstrip("\r\n") for line in f]
        except UnicodeDecodeError:
            raise DataError(f"{vocab_file}: not a UTF-8 text file") from None
        while tokens and tokens[-1] == "":  # a trailing blank line is not a token
            tokens.pop()
        return cls(tokens, lowercase=lowercase, source=vocab_file)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def vocab_hash(self) -> str:
        """sha256 of the canonical vocab.txt text (one token per line, "\\n"-terminated)."""
        return hashlib.sha256(self._vocab_text().encode("utf-8")).hexdigest()

    @property
    def files(self) -> list[str]:
        """Names of the files `save` writes."""
        return ["vocab.txt", "tokenizer.json", CONFIG_FILE]

    def _vocab_text(self) -> str:
        return "".join(t + "\n" for t in self._tokens)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without [CLS]/[SEP]."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self._tokens[i]

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def word_start_mask(self) -> "np.ndarray":
        """bool [vocab_size]: True where a token begins a word (WordPiece: not a "##" continuation).
        Whole-word masking groups each word start with the continuations that follow it."""
        import numpy as np  # pylint: disable=import-outside-toplevel
        return np.array([not t.startswith("##") for t in self._tokens], dtype=bool)

    def save(self, out_dir: str) -> str:
        """Write vocab.txt, tokenizer.json and tokenizer_config.json into `out_dir`; returns `out_dir`.

        The folder also loads with `transformers.AutoTokenizer.from_pretrained(out_dir)`.
        """
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write(self._vocab_text())
        self._backend.save(os.path.join(out_dir, "tokenizer.json"))
        config = {
            "tokenizer_class": "BertTokenizer",  # what transformers needs to pick the class
            "do_lower_case": self.lowercase,
            "lowercase": self.lowercase,
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "mask_token": "[MASK]",
            "vocab_hash": self.vocab_hash,
        }
        with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        return out_dir


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str, lowercase: bool = True) -> str:
    """Train a BERT-style WordPiece vocabulary on `texts` and save it (see `Tokenizer.save`) to `out_dir`.

    The vocabulary has at most `vocab_size` entries (fewer when the corpus is too small to learn that
    many) and starts with `SPECIAL_TOKENS` at ids 0..4. Returns `out_dir`.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DataError(f"vocab_size must be larger than {len(SPECIAL_TOKENS)}, got {vocab_size}")
    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                     lowercase=lowercase, wordpieces_prefix="##")
    # min_frequency=2 keeps one-off strings (hashes, long identifiers) out of the vocabulary; 1000
    # alphabet characters is BERT's usual cap so rare scripts fall back to [UNK] instead of eating slots.
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                special_tokens=list(SPECIAL_TOKENS), limit_alphabet=1000,
                                wordpieces_prefix="##")
    learned = trainer.get_vocab()
    tokens = [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1])]
    if tokens[:len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
        raise DataError(f"trained vocabulary does not start with {SPECIAL_TOKENS}: {tokens[:5]}")
    return Tokenizer(tokens, lowercase=lowercase).save(out_dir)
