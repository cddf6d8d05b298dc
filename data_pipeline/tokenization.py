"""Tokenizers: WordPiece (train, or load `vocab.txt` / `tokenizer.json`) and SentencePiece (train a unigram
or BPE model, or load a `.model`), behind one interface (`encode_batch`, `decode`, `vocab_size`,
`vocab_hash`, `files`, `save`, `id_to_token`, `token_to_id`, the special ids, `word_start_mask`).

`load_tokenizer(path)` picks the kind from the path; `Tokenizer.load` does the same, so code that loads
the folder a manifest names works for both kinds.

WordPiece:

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
import itertools
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

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
    def load(cls, path: str, lowercase: bool | None = None):
        """Load from a folder holding `vocab.txt` (or `spm.model`), or from a vocab.txt / tokenizer.json /
        SentencePiece `.model` file (a SentencePiece path gives a `SentencePieceTokenizer`).

        `lowercase=None` reads the flag from a `tokenizer_config.json` next to the vocab (ours, or a
        Hugging Face one with `do_lower_case`), defaulting to True (uncased) when there is none.
        """
        if _is_sentencepiece(path):
            return SentencePieceTokenizer.load(path, lowercase=lowercase)
        if path.endswith(".json") and os.path.isfile(path):
            return cls._load_tokenizer_json(path, lowercase)
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

    @classmethod
    def _load_tokenizer_json(cls, path: str, lowercase: bool | None) -> "Tokenizer":
        """A Hugging Face `tokenizer.json` with a WordPiece model (ids from its vocab map)."""
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict) or model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
            raise DataError(f"{path}: not a WordPiece tokenizer.json (model type "
                            f"{model.get('type') if isinstance(model, dict) else None!r})")
        vocab = model["vocab"]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise DataError(f"{path}: WordPiece ids are not 0..{len(tokens) - 1} without gaps")
        if lowercase is None:
            normalizer = spec.get("normalizer") or {}
            lowercase = bool(normalizer.get("lowercase", True))
        return cls(tokens, lowercase=lowercase, source=path)

    @property
    def kind(self) -> str:
        return "wordpiece"

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

    def word_start_mask(self) -> np.ndarray:
        """bool [vocab_size]: True where a token begins a word (WordPiece: not a "##" continuation).
        Whole-word masking groups each word start with the continuations that follow it."""
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


def _is_sentencepiece(path: str) -> bool:
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "spm.model")) and not os.path.isfile(os.path.join(path, "vocab.txt"))
    return path.endswith(".model")


def load_tokenizer(path: str, lowercase: bool | None = None):
    """A WordPiece or SentencePiece tokenizer from a folder, vocab.txt, tokenizer.json or `.model` file."""
    return Tokenizer.load(path, lowercase=lowercase)


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str, lowercase: bool = True) -> str:
    """Train a BERT-style WordPiece vocabulary on `texts` and save it (see `Tokenizer.save`) to `out_dir`.

    The vocabulary has at most `vocab_size` entries (fewer when the corpus is too small to learn that
    many) and starts with `SPECIAL_TOKENS` at ids 0..4, then the alphabet, the "##" continuation of each
    alphabet character, and the learned pieces. The same texts give the same vocabulary in every run (see
    below). `texts` is read once (spooled to a file under `out_dir`, removed afterwards). Returns `out_dir`.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DataError(f"vocab_size must be larger than {len(SPECIAL_TOKENS)}, got {vocab_size}")
    import tempfile

    from tokenizers import BertWordPieceTokenizer

    def train(files: list[str], size: int, specials: list[str]) -> list[str]:
        trainer = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                         lowercase=lowercase, wordpieces_prefix="##")
        # min_frequency=2 keeps one-off strings (hashes, long identifiers) out of the vocabulary; 1000
        # alphabet characters is BERT's usual cap so rare scripts fall back to [UNK] instead of eating slots.
        trainer.train(files, vocab_size=size, min_frequency=2, show_progress=False, special_tokens=specials,
                      limit_alphabet=1000, wordpieces_prefix="##")
        return [t for t, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])]

    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".train-", dir=out_dir) as tmp:
        spool = os.path.join(tmp, "texts.txt")
        with open(spool, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(text)
                f.write("\n")  # a line break is whitespace to WordPiece: documents may span lines
        # The `tokenizers` trainer numbers the "##x" pieces in hash-map order, which changes from process to
        # process, and breaks ties between equally frequent merges by those numbers: the same corpus gave
        # another vocabulary (order, and at larger sizes even the set) in every run (huggingface/tokenizers
        # #1794). A first pass with no merges finds the "##x" pieces; passing them, sorted, as fixed tokens
        # numbers them before the corpus is read, which makes the merges deterministic.
        continuations = sorted(t for t in train([spool], len(SPECIAL_TOKENS) + 1, list(SPECIAL_TOKENS))
                               if t.startswith("##"))
        tokens = train([spool], vocab_size, list(SPECIAL_TOKENS) + continuations)
    n_special = len(SPECIAL_TOKENS)
    if tokens[:n_special] != list(SPECIAL_TOKENS) or tokens[n_special:n_special + len(continuations)] != continuations:
        raise DataError(f"trained vocabulary does not start with {SPECIAL_TOKENS} and the ## pieces: "
                        f"{tokens[:n_special + len(continuations)]}")
    rest = tokens[n_special + len(continuations):]
    alphabet = list(itertools.takewhile(lambda t: len(t) == 1, rest))
    tokens = list(SPECIAL_TOKENS) + alphabet + continuations + rest[len(alphabet):]
    return Tokenizer(tokens, lowercase=lowercase).save(out_dir)


# ----------------------------------------------------------------------------------------------------------
# SentencePiece
#
# A trained model has the special pieces at fixed ids: [PAD]=0 (pad piece), [UNK]=1 (unknown piece),
# [CLS]=2 (bos piece), [SEP]=3 (eos piece), [MASK]=4 (control symbol). All five are control-type pieces, so
# text never encodes to them (a literal "[MASK]" in text is ordinary text) and `encode` adds none of them:
# packing adds [CLS]/[SEP]. A loaded model may place them elsewhere (ALBERT: <pad>=0, <unk>=1, [CLS]=2,
# [SEP]=3, [MASK]=4): pieces are looked up by name, with the model's own pad/unk ids as fallbacks.
# Uncased models are trained with the case-folding normalisation rule (`nmt_nfkc_cf`), which is stored in
# the model, so encoding with the model alone reproduces our ids.

SPM_FILE = "spm.model"
_SPM_KINDS = {"sentencepiece-unigram": "unigram", "sentencepiece-bpe": "bpe"}


class SentencePieceTokenizer:
    """A SentencePiece model with BERT's special pieces; the same interface as the WordPiece `Tokenizer`."""

    def __init__(self, model_bytes: bytes, source: str = "<memory>"):
        import sentencepiece as spm

        self._model_bytes = bytes(model_bytes)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        except (RuntimeError, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{source}: not a SentencePiece model ({reason})") from None
        n = self._sp.get_piece_size()
        self._pieces = [self._sp.id_to_piece(i) for i in range(n)]
        index = {p: i for i, p in enumerate(self._pieces)}
        fallback = {"[PAD]": self._sp.pad_id(), "[UNK]": self._sp.unk_id()}
        ids = []
        for name in SPECIAL_TOKENS:
            i = index.get(name, fallback.get(name, -1))
            if i is None or i < 0:
                missing = [t for t in SPECIAL_TOKENS if index.get(t, fallback.get(t, -1)) < 0]
                raise DataError(f"{source}: SentencePiece model lacks the special pieces {missing}")
            ids.append(i)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids
        controls = {i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        self.special_ids = tuple(sorted(controls | set(ids)))
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._model_bytes)
        self.model_type = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(proto.trainer_spec.model_type, "unigram")
        self.lowercase = proto.normalizer_spec.name.endswith("_cf")

    @classmethod
    def load(cls, path: str, lowercase: bool | None = None) -> "SentencePieceTokenizer":
        """Load a `.model` file, or a folder holding `spm.model`. Case handling is part of the model:
        `lowercase` (when not None) must agree with it."""
        model_file = os.path.join(path, SPM_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(model_file):
            raise DataError(f"no SentencePiece model at {model_file!r}")
        with open(model_file, "rb") as f:
            tok = cls(f.read(), source=model_file)
        if lowercase is not None and bool(lowercase) != tok.lowercase:
            raise DataError(f"{model_file}: the model is {'uncased' if tok.lowercase else 'cased'}, "
                            f"but a {'uncased' if lowercase else 'cased'} tokenizer was asked for")
        return tok

    @property
    def kind(self) -> str:
        return f"sentencepiece-{self.model_type}"

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def vocab_hash(self) -> str:
        """sha256 of the serialized model (the exact `spm.model` bytes)."""
        return hashlib.sha256(self._model_bytes).hexdigest()

    @property
    def files(self) -> list[str]:
        return [SPM_FILE, "spm.vocab", CONFIG_FILE]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Piece ids of each text (no [CLS]/[SEP]), exactly `SentencePieceProcessor.encode`."""
        return self._sp.encode(list(texts), out_type=int)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            special = set(self.special_ids)
            ids = [i for i in ids if i not in special]
        return self._sp.decode(ids)

    def id_to_token(self, i: int) -> str:
        return self._pieces[i]

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._pieces[i] == token else None  # piece_to_id maps unknown pieces to unk

    def word_start_mask(self) -> np.ndarray:
        """bool [vocab_size]: pieces starting with "▁" (a word start) and the special pieces."""
        mask = np.array([p.startswith("\u2581") for p in self._pieces], dtype=bool)
        mask[list(self.special_ids)] = True
        return mask

    def save(self, out_dir: str) -> str:
        """Write spm.model (the exact bytes), spm.vocab (piece and score per line) and tokenizer_config.json."""
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, SPM_FILE), "wb") as f:
            f.write(self._model_bytes)
        with open(os.path.join(out_dir, "spm.vocab"), "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(f"{p}\t{self._sp.get_score(i)}\n" for i, p in enumerate(self._pieces)))
        config = {"tokenizer_type": self.kind, "lowercase": self.lowercase, "model_file": SPM_FILE,
                  "special_ids": {"pad": self.pad_id, "unk": self.unk_id, "cls": self.cls_id,
                                  "sep": self.sep_id, "mask": self.mask_id},
                  "vocab_hash": self.vocab_hash}
        with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        return out_dir


def _sentences(texts: Iterable[str], max_bytes: int) -> Iterable[str]:
    """Lines of the documents, cut to SentencePiece's sentence-length limit (longer ones it would drop)."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if line:
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str, lowercase: bool = True,
                        model_type: str = "unigram", max_sentences: int = 2_000_000) -> str:
    """Train a SentencePiece unigram or BPE model on the lines of `texts` and save it to `out_dir`.

    Special pieces get ids 0..4 (see the comment above `SentencePieceTokenizer`). At most `max_sentences`
    lines are used (a seeded random sample when there are more), which bounds the trainer's memory.
    Returns `out_dir`.
    """
    if model_type not in ("unigram", "bpe"):
        raise DataError(f"SentencePiece model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DataError(f"vocab_size must be larger than {len(SPECIAL_TOKENS)}, got {vocab_size}")
    import io
    import sentencepiece as spm

    model = io.BytesIO()
    max_len = 4192
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_sentences(texts, max_len)), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=0.9995, max_sentence_length=max_len,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=2, bos_piece="[CLS]",
            eos_id=3, eos_piece="[SEP]", control_symbols=["[MASK]"], hard_vocab_limit=False,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {str(e).splitlines()[0] if str(e) else e}") from None
    return SentencePieceTokenizer(model.getvalue()).save(out_dir)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, out_dir: str, lowercase: bool = True) -> str:
    """Train a tokenizer of `kind` ("wordpiece", "sentencepiece-unigram", "sentencepiece-bpe") into `out_dir`."""
    if kind == "wordpiece":
        return train_wordpiece(texts, vocab_size, out_dir, lowercase=lowercase)
    if kind in _SPM_KINDS:
        return train_sentencepiece(texts, vocab_size, out_dir, lowercase=lowercase, model_type=_SPM_KINDS[kind])
    raise DataError(f"unknown tokenizer {kind!r} (wordpiece, sentencepiece-unigram, sentencepiece-bpe)")
