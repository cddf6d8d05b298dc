"""Tokenizers: WordPiece (train, or load `vocab.txt` / `tokenizer.json`) and SentencePiece (train a unigram
or BPE model, or load a `.model`), behind one interface: the abstract `Tokenizer` (`encode_batch`,
`decode`, `vocab_size`, `vocab_hash`, `files`, `save`, `id_to_token`, `token_to_id`, the special ids,
`word_start_mask`), implemented by `WordPieceTokenizer`, `SentencePieceTokenizer` and `JsonTokenizer` (any Hugging
Face tokenizer.json: an imported SentencePiece-based one, and `ByteLevelBPETokenizer`, RoBERTa's byte-level BPE).

`Tokenizer.load(path)` is the one entry: it picks the kind from the path, so code that loads the folder a
manifest names works for every kind. `word_start_table` gives the whole-word-masking table of a dataset.

WordPiece: backed by the Hugging Face `tokenizers` library (Rust, fast, multi-threaded `encode_batch`) and
configured like BERT's: BERT normaliser (lowercasing and accent stripping when uncased), BERT pre-tokenizer
(whitespace + punctuation split), WordPiece with the `##` continuing-subword prefix. Ids are line numbers of
`vocab.txt`. A trained vocabulary starts with the five special tokens `[PAD]`=0, `[UNK]`=1, `[CLS]`=2,
`[SEP]`=3, `[MASK]`=4; a loaded one may place them anywhere (the original BERT vocab: 0, 100, 101, 102,
103), so callers always use the `*_id` attributes.

Reproducibility: the `tokenizers` trainer alone is not bit-exact across runs (huggingface/tokenizers issue
#1794); `tokenizer_backends.train_wordpiece_tokens` makes it so. Datasets are also reproducible from a saved
vocabulary (`pretokenize --vocab`), and the manifest records `vocab_hash` to tell vocabularies apart.

SentencePiece: a trained model has the special pieces at fixed ids: [PAD]=0 (pad piece), [UNK]=1 (unknown
piece), [CLS]=2 (bos piece), [SEP]=3 (eos piece), [MASK]=4 (control symbol). All five are control-type
pieces, so text never encodes to them (a literal "[MASK]" in text is ordinary text) and `encode` adds none
of them: packing adds [CLS]/[SEP]. A loaded model may place them elsewhere (ALBERT: <pad>=0, <unk>=1,
[CLS]=2, [SEP]=3, [MASK]=4): pieces are looked up by name, with the model's own pad/unk ids as fallbacks.
Uncased models are trained with the case-folding normalisation rule (`nmt_nfkc_cf`), which is stored in
the model, so encoding with the model alone reproduces our ids.

(This module is not called `tokenizers.py`: that name would shadow the Hugging Face package.)
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from data_pipeline import paths
from data_pipeline import tokenizer_backends as backends
from data_pipeline.errors import DataError
from data_pipeline.manifest import Manifest

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONFIG_FILE = "tokenizer_config.json"
SPM_FILE = "spm.model"
SPM_KINDS = {"sentencepiece-unigram": "unigram", "sentencepiece-bpe": "bpe"}
JSON_FILE = "tokenizer.json"
BPE_VOCAB, BPE_MERGES = "vocab.json", "merges.txt"
# A trained byte-level BPE's special tokens and their ids, RoBERTa's: <s>=0 (its [CLS]), <pad>=1, </s>=2 (its
# [SEP]), <unk>=3, then <mask>=4 (roberta-base has it last; here it comes before the learned tokens).
BYTELEVEL_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# `[` and `]` are punctuation to the BERT pre-tokenizer, so no token learned from text can look like
# `[XXX]`: any vocabulary entry of that shape ([PAD], [unused17], ...) is a special token.
_SPECIAL_RE = re.compile(r"^\[[A-Za-z0-9_]+\]$")


class Tokenizer(abc.ABC):
    """What every tokenizer of ours offers. Ids: `pad_id`, `unk_id`, `cls_id`, `sep_id`, `mask_id` (the five
    special tokens) and `special_ids` (every id masking must never pick: those five and any [unusedN] or
    other control piece); `lowercase`: whether the tokenizer is uncased."""

    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    lowercase: bool

    @staticmethod
    def load(path: str, lowercase: bool | None = None) -> "Tokenizer":
        """Load from a folder holding `vocab.txt` (or `spm.model`), or from a vocab.txt / tokenizer.json /
        SentencePiece `.model` file: a `WordPieceTokenizer` or a `SentencePieceTokenizer`.

        `lowercase=None` takes the case handling from the files (a WordPiece `tokenizer_config.json`, ours or a
        Hugging Face one with `do_lower_case`, defaulting to uncased; the SentencePiece model itself); a
        SentencePiece model refuses a `lowercase` that disagrees with it. An object-store URL (gs://...) is
        read from a local copy (`data_pipeline.paths.local_copy`).
        """
        path = paths.local_copy(path)
        if _is_sentencepiece(path):
            return SentencePieceTokenizer.from_file(path, lowercase)
        if _is_tokenizer_json(path):
            return JsonTokenizer.from_file(path, lowercase)
        return WordPieceTokenizer.from_file(path, lowercase)

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """"wordpiece", "sentencepiece-unigram", "sentencepiece-bpe", ... (the manifest's tokenizer type)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        ...

    @property
    @abc.abstractmethod
    def vocab_hash(self) -> str:
        """sha256 identifying the vocabulary (recorded in the manifest and checkpoints)."""

    @property
    @abc.abstractmethod
    def files(self) -> list[str]:
        """Names of the files `save` writes."""

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without [CLS]/[SEP]."""

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ...

    @abc.abstractmethod
    def id_to_token(self, i: int) -> str:
        ...

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, None when it is not in the vocabulary."""

    @abc.abstractmethod
    def word_start_mask(self) -> np.ndarray:
        """bool [vocab_size]: True where a token begins a word. Whole-word masking groups each word start with
        the continuations that follow it."""

    @abc.abstractmethod
    def save(self, out_dir: str) -> str:
        """Write `files` (and tokenizer_config.json) into `out_dir`; returns `out_dir`."""

    @abc.abstractmethod
    def save_hf(self, out_dir: str, model_max_length: int) -> list[str]:
        """Write the tokenizer files of a Hugging Face folder into `out_dir` (tokenizer.json,
        tokenizer_config.json with `model_max_length`, special_tokens_map.json, and vocab.txt for WordPiece), so
        that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it offline and gives our ids (see
        `encode_hf_batch`); -> the names written."""

    def special_tokens(self) -> dict[str, str]:
        """{"pad_token": ..., "unk_token": ..., "cls_token": ..., "sep_token": ..., "mask_token": ...}: the text of
        the five special tokens (the pieces at their ids)."""
        names = ("pad", "unk", "cls", "sep", "mask")
        ids = (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)
        return {f"{k}_token": self.id_to_token(i) for k, i in zip(names, ids)}

    def encode_hf_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids the folder `save_hf` writes gives each text (`add_special_tokens=False`): `encode_batch`'s,
        except that the text of a special token ("[MASK]") is that token, as in every Hugging Face tokenizer
        (fill-mask depends on it). The text between such tokens is encoded piece by piece."""
        specials = {t: self.token_to_id(t) for t in self.special_tokens().values()}
        # Longest first: the leftmost-longest match, as the Hugging Face added-token matcher does.
        split = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")
        parts = [split.split(text) for text in texts]
        pieces = iter(self.encode_batch([p for ps in parts for p in ps[0::2]]))
        out = []
        for ps in parts:
            ids = []
            for k, p in enumerate(ps):
                ids += next(pieces) if k % 2 == 0 else [specials[p]]
            out.append(ids)
        return out

    def _special_config(self) -> dict:
        return {"pad": self.pad_id, "unk": self.unk_id, "cls": self.cls_id, "sep": self.sep_id,
                "mask": self.mask_id}


def _is_sentencepiece(path: str) -> bool:
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, SPM_FILE)) and not os.path.isfile(os.path.join(path, "vocab.txt"))
    return path.endswith(".model")


def _is_tokenizer_json(path: str) -> bool:
    """A folder with a tokenizer.json (or a byte-level vocab.json + merges.txt) and no vocab.txt, or a
    tokenizer.json file whose model is not WordPiece (WordPieceTokenizer reads those)."""
    if os.path.isdir(path):
        has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
        return not has("vocab.txt") and (has(JSON_FILE) or (has(BPE_VOCAB) and has(BPE_MERGES)))
    if os.path.basename(path) == BPE_VOCAB:
        return True
    return (path.endswith(".json") and os.path.isfile(path)
            and backends.read_tokenizer_spec(path)["model"].get("type") != "WordPiece")


def _write_config(out_dir: str, config: dict) -> None:
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def _marked_word_starts(tokens: Sequence[str], marker: str, special_ids: Iterable[int]) -> np.ndarray:
    """[len(tokens)] bool: the tokens that start with the word-start `marker`, and the special tokens."""
    mask = np.array([t.startswith(marker) for t in tokens], dtype=bool)
    mask[list(special_ids)] = True
    return mask


class WordPieceTokenizer(Tokenizer):
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
        self._backend = backends.wordpiece_backend(vocab, self.lowercase, SPECIAL_TOKENS)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in SPECIAL_TOKENS)
        self.special_ids = tuple(i for i, t in enumerate(self._tokens) if _SPECIAL_RE.match(t))

    @classmethod
    def from_file(cls, path: str, lowercase: bool | None = None) -> "WordPieceTokenizer":
        """From a folder holding vocab.txt, a vocab.txt or a Hugging Face tokenizer.json (see `Tokenizer.load`)."""
        if path.endswith(".json") and os.path.isfile(path):
            tokens, json_lowercase = backends.read_tokenizer_json(path)
            return cls(tokens, lowercase=json_lowercase if lowercase is None else lowercase, source=path)
        vocab_file = os.path.join(path, "vocab.txt") if os.path.isdir(path) else path
        if not os.path.isfile(vocab_file):
            raise DataError(f"no WordPiece vocabulary at {vocab_file!r}")
        if lowercase is None:
            config_file = os.path.join(os.path.dirname(vocab_file), CONFIG_FILE)
            config = backends.read_json_config(config_file) if os.path.isfile(config_file) else {}
            lowercase = bool(config.get("lowercase", config.get("do_lower_case", True)))
        return cls(backends.read_vocab_txt(vocab_file), lowercase=lowercase, source=vocab_file)

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
        return ["vocab.txt", "tokenizer.json", CONFIG_FILE]

    def _vocab_text(self) -> str:
        return "".join(t + "\n" for t in self._tokens)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The fast variant skips the character offsets we never use: the same ids, ~10-20% less time.
        return [e.ids for e in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self._tokens[i]

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def word_start_mask(self) -> np.ndarray:
        """WordPiece: every token but the "##" continuations."""
        return np.array([not t.startswith("##") for t in self._tokens], dtype=bool)

    def save(self, out_dir: str) -> str:
        """vocab.txt, tokenizer.json and tokenizer_config.json; the folder also loads with
        `transformers.AutoTokenizer.from_pretrained(out_dir)`."""
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write(self._vocab_text())
        self._backend.save(os.path.join(out_dir, "tokenizer.json"))
        _write_config(out_dir, {
            "tokenizer_class": "BertTokenizer",  # what transformers needs to pick the class
            "do_lower_case": self.lowercase,
            "lowercase": self.lowercase,
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "mask_token": "[MASK]",
            "vocab_hash": self.vocab_hash,
        })
        return out_dir

    def encode_hf_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode_batch`: the backend already maps the text of a special token to its id."""
        return self.encode_batch(texts)

    def save_hf(self, out_dir: str, model_max_length: int) -> list[str]:
        """vocab.txt and tokenizer.json (ours, so ids agree by construction), and transformers' BertTokenizer
        configs."""
        self.save(out_dir)
        tokens = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS))
        config = {
            "tokenizer_class": "BertTokenizer",  # the tokenizers-backed class in transformers 5
            "do_lower_case": self.lowercase,
            "strip_accents": None,  # follows do_lower_case, as our normaliser does
            "tokenize_chinese_chars": True,
            "model_max_length": model_max_length,
            "vocab_hash": self.vocab_hash,  # provenance: the hash our data manifests record
            **tokens,
        }
        return ["vocab.txt", "tokenizer.json", *_write_hf_configs(out_dir, config, tokens)]


def _write_hf_configs(out_dir: str, config: dict, special_tokens: dict) -> list[str]:
    """tokenizer_config.json and special_tokens_map.json of a Hugging Face folder; -> their names."""
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_tokens, f, indent=2)
    return [CONFIG_FILE, "special_tokens_map.json"]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with BERT's special pieces; see the module docstring."""

    def __init__(self, model_bytes: bytes, source: str = "<memory>"):
        self._model_bytes = bytes(model_bytes)
        self._sp, self.model_type, self.lowercase = backends.sentencepiece_processor(self._model_bytes, source)
        n = self._sp.get_piece_size()
        self._pieces = [self._sp.id_to_piece(i) for i in range(n)]
        index = {p: i for i, p in enumerate(self._pieces)}
        fallback = {"[PAD]": self._sp.pad_id(), "[UNK]": self._sp.unk_id()}
        ids = [index.get(name, fallback.get(name, -1)) for name in SPECIAL_TOKENS]
        if any(i < 0 for i in ids):
            missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i < 0]
            raise DataError(f"{source}: SentencePiece model lacks the special pieces {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids
        controls = {i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        self.special_ids = tuple(sorted(controls | set(ids)))

    @classmethod
    def from_file(cls, path: str, lowercase: bool | None = None) -> "SentencePieceTokenizer":
        """From a `.model` file or a folder holding `spm.model`. Case handling is part of the model:
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
        """Exactly `SentencePieceProcessor.encode` of each text."""
        return self._sp.encode(list(texts), out_type=int)

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
        """SentencePiece: pieces starting with "▁" (a word start) and the special pieces."""
        return _marked_word_starts(self._pieces, "\u2581", self.special_ids)

    def save(self, out_dir: str) -> str:
        """spm.model (the exact bytes), spm.vocab (piece and score per line) and tokenizer_config.json."""
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, SPM_FILE), "wb") as f:
            f.write(self._model_bytes)
        with open(os.path.join(out_dir, "spm.vocab"), "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(f"{p}\t{self._sp.get_score(i)}\n" for i, p in enumerate(self._pieces)))
        _write_config(out_dir, {"tokenizer_type": self.kind, "lowercase": self.lowercase, "model_file": SPM_FILE,
                                "special_ids": self._special_config(), "vocab_hash": self.vocab_hash})
        return out_dir

    def hf_backend(self):
        """The `tokenizers.Tokenizer` that gives this model's ids (`tokenizer_backends.sentencepiece_hf_backend`)."""
        tokens = self.special_tokens()
        ids = (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)
        return backends.sentencepiece_hf_backend(self._model_bytes, list(zip(tokens.values(), ids)),
                                                 tokens["cls_token"], tokens["sep_token"])

    def save_hf(self, out_dir: str, model_max_length: int) -> list[str]:
        """tokenizer.json (built from the model: `hf_backend`) and transformers' PreTrainedTokenizerFast configs;
        no spm.model, which a fast tokenizer does not read."""
        os.makedirs(out_dir, exist_ok=True)
        self.hf_backend().save(os.path.join(out_dir, "tokenizer.json"))
        tokens = self.special_tokens()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # loads tokenizer.json as is (transformers 4 and 5)
            "model_max_length": model_max_length,
            # BERT takes token types (a pair's second text is type 1); transformers 5's default leaves them out.
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
            "clean_up_tokenization_spaces": False,  # SentencePiece's decode leaves no spaces to clean
            "tokenizer_type": self.kind,
            "lowercase": self.lowercase,  # case folding is part of the normaliser in tokenizer.json
            "vocab_hash": self.vocab_hash,  # provenance: the hash our data manifests record
            **tokens,
        }
        return ["tokenizer.json", *_write_hf_configs(out_dir, config, tokens)]


_ROLES = ("pad", "unk", "cls", "sep", "mask")
# Role -> the names a special token goes by (BERT's, then RoBERTa's / SentencePiece models'), for a tokenizer.json
# whose configs do not name it; RoBERTa's configs call [CLS] and [SEP] bos_token and eos_token.
_ROLE_NAMES = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>"),
               "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>")}
_ROLE_FALLBACK_KEYS = {"cls": "bos_token", "sep": "eos_token"}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _json_folder_config(folder: str) -> dict:
    """special_tokens_map.json updated with tokenizer_config.json (ours or a Hugging Face one), {} for neither."""
    config = {}
    for name in ("special_tokens_map.json", CONFIG_FILE):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            config.update(backends.read_json_config(path))
    return config


def _special_tokens(config: dict, vocab: dict[str, int]) -> dict[str, str]:
    """{role: token text} of the five roles: the configs' `{role}_token` (bos/eos for cls/sep), else the first of
    the usual names that the vocabulary has; a role neither gives is left out."""
    out = {}
    for role in _ROLES:
        named = _token_text(config.get(f"{role}_token")) or _token_text(config.get(_ROLE_FALLBACK_KEYS.get(role)))
        if named in vocab:
            out[role] = named
            continue
        found = next((t for t in _ROLE_NAMES[role] if t in vocab), None)
        if found is not None:
            out[role] = found
    return out


class JsonTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` of a BPE or Unigram model, run by the `tokenizers` library as transformers
    runs it (so our ids are the Hugging Face tokenizer's by construction): the tokenizer of an imported folder
    whose tokenizer is SentencePiece-based (an ALBERT-style BERT, or one of our SentencePiece exports, which carry
    no spm.model), and, through `ByteLevelBPETokenizer`, GPT-2 / RoBERTa's byte-level BPE.

    The five special roles are found by name: the folder's tokenizer_config.json / special_tokens_map.json
    (`pad_token`, ..., RoBERTa's `bos_token` / `eos_token` for [CLS] / [SEP]), else the usual names ([PAD] or
    <pad>, ...). Whole words start at the pre-tokenizer's word marker ("▁" for Metaspace, "Ġ" for ByteLevel);
    special tokens count as word starts.

    `encode_batch` reads the text of a special token ("<s>", "[CLS]", "<mask>") as ordinary text, as SentencePiece
    does and as RoBERTa's own preprocessing did: a literal "<s>" in a document must not become the id that starts
    a packed document. `encode_hf_batch` gives the Hugging Face tokenizer's ids, where such text is the token."""

    def __init__(self, backend, special_tokens: dict[str, str], lowercase: bool, source: str = "<memory>"):
        from tokenizers import Tokenizer as HFTokenizer

        self._backend = backend
        self._text = backend.to_str()
        self._plain = HFTokenizer.from_str(self._text)  # the same tokenizer, special tokens' text as text
        self._plain.encode_special_tokens = True
        self._spec = json.loads(self._text)
        self._vocab = backend.get_vocab(with_added_tokens=True)
        self._tokens = [""] * len(self._vocab)
        for token, i in self._vocab.items():
            if not 0 <= i < len(self._tokens) or self._tokens[i]:
                raise DataError(f"{source}: token ids are not 0..{len(self._vocab) - 1} without gaps")
            self._tokens[i] = token
        missing = [role for role in _ROLES if role not in special_tokens]
        if missing:
            raise DataError(f"{source}: no {', '.join(f'{r}_token' for r in missing)} found (name them in "
                            f"{CONFIG_FILE}, or use the tokens {[_ROLE_NAMES[r][0] for r in missing]})")
        self._special_tokens = dict(special_tokens)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self._vocab[special_tokens[r]] for r in _ROLES)
        added = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special_ids = tuple(sorted(added | {self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id}))
        self.lowercase = bool(lowercase)
        self._marker = backends.word_marker(self._spec)

    @classmethod
    def from_file(cls, path: str, lowercase: bool | None = None) -> "Tokenizer":
        """From a tokenizer.json, or a folder holding one, or a byte-level vocab.json (+ merges.txt beside it, also
        when a folder holds only those two); a WordPiece
        tokenizer.json gives a `WordPieceTokenizer`. `lowercase` (when not None) must agree with the files: case
        handling is part of the tokenizer's normaliser."""
        from tokenizers import Tokenizer as HFTokenizer

        folder = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, JSON_FILE) if os.path.isdir(path) else path
        config = _json_folder_config(folder)
        if not os.path.isfile(file) or os.path.basename(file) == BPE_VOCAB:
            return ByteLevelBPETokenizer.from_vocab_merges(folder, config, lowercase)
        spec = backends.read_tokenizer_spec(file)
        if spec["model"].get("type") == "WordPiece":
            return WordPieceTokenizer.from_file(file, lowercase)
        try:
            backend = HFTokenizer.from_file(file)
        except Exception as e:  # pylint: disable=broad-except  # the Rust side raises plain Exception
            raise DataError(f"{file}: not a tokenizer.json the tokenizers library reads ({e})") from None
        byte_level = spec["model"].get("type") == "BPE" and backends.word_marker(spec) == "\u0120"
        kind = ByteLevelBPETokenizer if byte_level else JsonTokenizer
        tok = kind(backend, _special_tokens(config, backend.get_vocab(with_added_tokens=True)),
                   _lowercase(config, backend), source=file)
        if lowercase is not None and bool(lowercase) != tok.lowercase:
            raise DataError(f"{file}: the tokenizer is {'uncased' if tok.lowercase else 'cased'}, but a "
                            f"{'uncased' if lowercase else 'cased'} tokenizer was asked for")
        return tok

    @property
    def kind(self) -> str:
        """"json-unigram", "json-bpe", ...: a tokenizer.json of that model."""
        return f"json-{str(self._spec['model'].get('type')).lower()}"

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def vocab_hash(self) -> str:
        """sha256 of the tokenizer as the `tokenizers` library serialises it (compact JSON)."""
        return hashlib.sha256(self._text.encode("utf-8")).hexdigest()

    @property
    def files(self) -> list[str]:
        return [JSON_FILE, CONFIG_FILE]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, the text of a special token read as text (see the class docstring)."""
        return [e.ids for e in self._plain.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_hf_batch(self, texts: list[str]) -> list[list[int]]:
        """The Hugging Face tokenizer's ids (its tokenizer.json is this one): a special token's text is the token."""
        return [e.ids for e in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self._tokens[i]

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def word_start_mask(self) -> np.ndarray:
        """Tokens starting with the word marker ("▁" or "Ġ") and the special tokens; every token where the
        pre-tokenizer has no marker."""
        if self._marker is None:
            return np.ones(len(self._tokens), dtype=bool)
        return _marked_word_starts(self._tokens, self._marker, self.special_ids)

    def special_tokens(self) -> dict[str, str]:
        return {f"{role}_token": self._special_tokens[role] for role in _ROLES}

    def save(self, out_dir: str) -> str:
        """tokenizer.json and tokenizer_config.json (its kind, case, special tokens and hash)."""
        os.makedirs(out_dir, exist_ok=True)
        self._backend.save(os.path.join(out_dir, JSON_FILE))
        _write_config(out_dir, {"tokenizer_type": self.kind, "lowercase": self.lowercase, **self.special_tokens(),
                                "vocab_hash": self.vocab_hash})
        return out_dir

    def _hf_config(self, model_max_length: int) -> dict:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",  # loads tokenizer.json as is (transformers 4 and 5)
            "model_max_length": model_max_length,
            # BERT takes token types (a pair's second text is type 1); transformers 5's default leaves them out.
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
            "clean_up_tokenization_spaces": False,
            "tokenizer_type": self.kind,
            "lowercase": self.lowercase,  # case handling is part of the normaliser in tokenizer.json
            "vocab_hash": self.vocab_hash,  # provenance: the hash our data manifests record
            **self.special_tokens(),
        }

    def save_hf(self, out_dir: str, model_max_length: int) -> list[str]:
        """tokenizer.json (this one) and transformers' PreTrainedTokenizerFast configs."""
        os.makedirs(out_dir, exist_ok=True)
        self._backend.save(os.path.join(out_dir, JSON_FILE))
        return [JSON_FILE, *_write_hf_configs(out_dir, self._hf_config(model_max_length), self.special_tokens())]


def _lowercase(config: dict, backend) -> bool:
    """Whether a tokenizer.json's tokenizer is uncased: its config's `lowercase` / `do_lower_case`, else whether
    its normaliser folds case."""
    for key in ("lowercase", "do_lower_case"):
        if isinstance(config.get(key), bool):
            return config[key]
    return backend.normalizer is not None and backend.normalizer.normalize_str("AZ") == "az"


class ByteLevelBPETokenizer(JsonTokenizer):
    """GPT-2 / RoBERTa's byte-level BPE (`tokenizer_backends.bytelevel_bpe_backend`): every text encodes without
    an unknown token; a word after a space starts with "Ġ" (the first word of a text has no marker: whole-word
    masking then groups it with what precedes, which is a special token, so it starts a word of its own).
    Trained (`tokenizer_training.train_bytelevel_bpe`) with RoBERTa's special tokens
    (`BYTELEVEL_SPECIAL_TOKENS`), or loaded from a tokenizer.json or a vocab.json + merges.txt pair.
    `save` also writes vocab.json + merges.txt; an export loads in transformers as a RobertaTokenizer (cased; an
    uncased one as a PreTrainedTokenizerFast)."""

    @classmethod
    def from_vocab_merges(cls, folder: str, config: dict | None = None,
                          lowercase: bool | None = None) -> "ByteLevelBPETokenizer":
        """From `folder`'s vocab.json + merges.txt (RoBERTa's special tokens unless its configs name others)."""
        vocab_file, merges_file = os.path.join(folder, BPE_VOCAB), os.path.join(folder, BPE_MERGES)
        if not (os.path.isfile(vocab_file) and os.path.isfile(merges_file)):
            raise DataError(f"no tokenizer at {folder!r} (no {JSON_FILE}, nor {BPE_VOCAB} + {BPE_MERGES})")
        vocab, merges = backends.read_vocab_merges(vocab_file, merges_file)
        config = config if config is not None else _json_folder_config(folder)
        return cls.build(vocab, merges, _special_tokens(config, vocab),
                         bool(config.get("lowercase", False)) if lowercase is None else lowercase, vocab_file)

    @classmethod
    def build(cls, vocab: dict[str, int], merges, special_tokens: dict[str, str], lowercase: bool,
              source: str = "<memory>") -> "ByteLevelBPETokenizer":
        """From a vocabulary, its merges and the {role: token} of the five special roles."""
        missing = [r for r in _ROLES if r not in special_tokens]
        if missing:
            raise DataError(f"{source}: no {', '.join(f'{r}_token' for r in missing)} in the vocabulary")
        specials = sorted(set(special_tokens.values()), key=lambda t: vocab[t])
        backend = backends.bytelevel_bpe_backend(vocab, merges, lowercase, specials, special_tokens["cls"],
                                                 special_tokens["sep"], special_tokens["mask"])
        return cls(backend, special_tokens, lowercase, source)

    @property
    def kind(self) -> str:
        return "bytelevel-bpe"

    @property
    def files(self) -> list[str]:
        return [JSON_FILE, BPE_VOCAB, BPE_MERGES, CONFIG_FILE]

    def save(self, out_dir: str) -> str:
        """tokenizer.json, vocab.json + merges.txt (what GPT-2 / RoBERTa tooling reads) and tokenizer_config.json."""
        super().save(out_dir)
        self._backend.model.save(out_dir)
        return out_dir

    def _hf_config(self, model_max_length: int) -> dict:
        """RobertaTokenizer's configs; an uncased tokenizer stays a PreTrainedTokenizerFast, which loads tokenizer.json
        as is (transformers 5's RobertaTokenizer rebuilds the pipeline from the vocabulary and drops the Lowercase
        normaliser: measured, other ids)."""
        tokens = self.special_tokens()
        return {**super()._hf_config(model_max_length),
                "tokenizer_class": "PreTrainedTokenizerFast" if self.lowercase else "RobertaTokenizer",
                # RoBERTa takes no token types (type_vocab_size 1).
                "model_input_names": ["input_ids", "attention_mask"],
                "bos_token": tokens["cls_token"], "eos_token": tokens["sep_token"], "add_prefix_space": False,
                "trim_offsets": True}

    def save_hf(self, out_dir: str, model_max_length: int) -> list[str]:
        """tokenizer.json, vocab.json + merges.txt, and transformers' RobertaTokenizer configs."""
        names = super().save_hf(out_dir, model_max_length)
        self._backend.model.save(out_dir)
        return names + [BPE_VOCAB, BPE_MERGES]


# ---- a dataset's tokenizer ------------------------------------------------------------------------------------

def word_start_table(data_dir: str, manifest: Manifest) -> bytes:
    """The word-start mask (bool [vocab_size], True where a token begins a word) of the tokenizer folder the
    manifest of `data_dir` names, as bytes: the form bert_jax.masking.MaskingSpec takes. DataError when the
    tokenizer's size differs from the manifest's vocab_size."""
    if manifest.tokenizer is None:
        raise DataError(f"{data_dir}: the manifest names no tokenizer folder")
    tok_dir = paths.join(data_dir, manifest.tokenizer.dir)
    mask = np.asarray(Tokenizer.load(tok_dir).word_start_mask(), dtype=bool)
    if mask.shape != (manifest.vocab_size,):
        raise DataError(f"{tok_dir}: the tokenizer has {mask.size} tokens, the manifest says "
                        f"vocab_size={manifest.vocab_size}")
    return mask.tobytes()
