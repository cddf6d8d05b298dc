"""The third-party machinery behind `data_pipeline.tokenization`: the Hugging Face `tokenizers` WordPiece
pipeline configured like BERT's, vocabulary file readers, the WordPiece and SentencePiece trainers, and the
`tokenizers` pipeline that reproduces a SentencePiece model (the tokenizer.json of an exported HF folder).

The functions here return plain values (token lists, model bytes, a backend object); the `Tokenizer`
classes that callers use are in `data_pipeline.tokenization`, which passes the special tokens in.

`tokenizers` and `sentencepiece` are imported inside the functions that use them, never at module level:
their native thread pools must not exist yet when `data_pipeline.sources` forks its extraction pool (it
stays serial once they are loaded), and `import data_pipeline.tokenization` stays cheap.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import struct
import tempfile
import types
from typing import Iterable, Sequence

from data_pipeline import records
from data_pipeline.errors import DataError


def wordpiece_backend(vocab: dict[str, int], lowercase: bool, special_tokens: Sequence[str]):
    """A `tokenizers.Tokenizer` for a WordPiece vocab, configured like BERT's (and like HF's BERT files).
    `special_tokens`: [PAD], [UNK], [CLS], [SEP], [MASK] in that order."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, \
        pre_tokenizers, processors

    unk, cls, sep = special_tokens[1], special_tokens[2], special_tokens[3]
    tok = HFTokenizer(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##",
                                       max_input_chars_per_word=100))
    # strip_accents=None follows `lowercase`, as in the original BERT uncased/cased models.
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    # Registered as added tokens so that a literal "[MASK]" in text maps to its id, exactly as a Hugging
    # Face BERT tokenizer does (the equality test against transformers depends on it).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    # The post-processor only matters for users of the saved tokenizer.json (e.g. a converted HF model):
    # `encode_batch` never adds [CLS]/[SEP]; packing does that.
    tok.post_processor = processors.BertProcessing((sep, vocab[sep]), (cls, vocab[cls]))
    return tok


def read_vocab_txt(vocab_file: str) -> list[str]:
    """The tokens of a vocab.txt, one per line (ids are line numbers); a trailing blank line is no token."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            tokens = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError:
        raise DataError(f"{vocab_file}: not a UTF-8 text file") from None
    while tokens and tokens[-1] == "":
        tokens.pop()
    return tokens


def read_json_config(config_file: str) -> dict:
    try:
        with open(config_file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{config_file}: invalid JSON ({e.msg})") from None


def read_tokenizer_json(path: str) -> tuple[list[str], bool]:
    """(tokens by id, the normaliser's lowercase flag) of a Hugging Face `tokenizer.json` with a WordPiece model."""
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
    normalizer = spec.get("normalizer") or {}
    return tokens, bool(normalizer.get("lowercase", True))


def train_wordpiece_tokens(texts: Iterable[str], vocab_size: int, work_dir: str, lowercase: bool,
                           special_tokens: Sequence[str]) -> list[str]:
    """A trained WordPiece vocabulary: `special_tokens`, the alphabet, the "##" continuation of each alphabet
    character, then the learned pieces. `texts` is spooled once to a file under `work_dir` (removed after)."""
    from tokenizers import BertWordPieceTokenizer

    def train(files: list[str], size: int, specials: list[str]) -> list[str]:
        trainer = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                         lowercase=lowercase, wordpieces_prefix="##")
        # min_frequency=2 keeps one-off strings (hashes, long identifiers) out of the vocabulary; 1000
        # alphabet characters is BERT's usual cap so rare scripts fall back to [UNK] instead of eating slots.
        trainer.train(files, vocab_size=size, min_frequency=2, show_progress=False, special_tokens=specials,
                      limit_alphabet=1000, wordpieces_prefix="##")
        return [t for t, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])]

    specials = list(special_tokens)
    os.makedirs(work_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".train-", dir=work_dir) as tmp:
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
        continuations = sorted(t for t in train([spool], len(specials) + 1, specials) if t.startswith("##"))
        tokens = train([spool], vocab_size, specials + continuations)
    n_special = len(specials)
    if tokens[:n_special] != specials or tokens[n_special:n_special + len(continuations)] != continuations:
        raise DataError(f"trained vocabulary does not start with {tuple(specials)} and the ## pieces: "
                        f"{tokens[:n_special + len(continuations)]}")
    rest = tokens[n_special + len(continuations):]
    alphabet = list(itertools.takewhile(lambda t: len(t) == 1, rest))
    return specials + alphabet + continuations + rest[len(alphabet):]


# SentencePiece's piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type).
SP_NORMAL, SP_UNKNOWN, SP_USER_DEFINED = 1, 2, 4


def sentencepiece_model_spec(model_bytes: bytes) -> types.SimpleNamespace:
    """The fields of a serialized SentencePiece ModelProto that the tokenizers here need, read with
    `records.message_fields` (field numbers and proto2 defaults of sentencepiece_model.proto) rather than the
    `sentencepiece_model_pb2` module, whose generated code pins the protobuf runtime's major version (0.2.3
    needs protobuf 7; apache-beam caps it below 7): pieces [(piece, score, type)], model_type (1 unigram,
    2 bpe, 3 word, 4 char), unk_id, byte_fallback, split_by_whitespace, and the normalizer's name,
    precompiled_charsmap, add_dummy_prefix, remove_extra_whitespaces. ValueError if malformed."""
    pieces, trainer, normalizer = [], {}, {}
    for number, wire, value in records.message_fields(model_bytes):
        if wire != 2:
            continue
        if number == 1:
            piece = {1: b"", 2: b"\0\0\0\0", 3: SP_NORMAL}
            piece.update((n, v) for n, _, v in records.message_fields(value))
            pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0], piece[3]))
        elif number in (2, 3):  # trainer_spec, normalizer_spec (last value of each field wins, as in protobuf)
            (trainer if number == 2 else normalizer).update((n, v) for n, _, v in records.message_fields(value))
    return types.SimpleNamespace(
        pieces=pieces, model_type=trainer.get(3, 1), unk_id=trainer.get(40, 0),
        byte_fallback=bool(trainer.get(35, 0)), split_by_whitespace=bool(trainer.get(22, 1)),
        normalizer_name=normalizer.get(1, b"").decode("utf-8"), precompiled_charsmap=normalizer.get(2, b""),
        add_dummy_prefix=bool(normalizer.get(3, 1)), remove_extra_whitespaces=bool(normalizer.get(4, 1)))


def sentencepiece_processor(model_bytes: bytes, source: str):
    """(SentencePieceProcessor, model type name, lowercase) of a serialized model; DataError if it is none."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except (RuntimeError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{source}: not a SentencePiece model ({reason})") from None
    spec = sentencepiece_model_spec(model_bytes)
    model_type = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(spec.model_type, "unigram")
    return sp, model_type, spec.normalizer_name.endswith("_cf")


def sentencepiece_hf_backend(model_bytes: bytes, special_tokens: Sequence[tuple[str, int]], cls: str, sep: str):
    """A `tokenizers.Tokenizer` that gives SentencePiece's ids for a serialized unigram or BPE model (the
    `tokenizer.json` of an exported Hugging Face folder). `special_tokens`: (piece, id) of [PAD], [UNK], [CLS],
    [SEP], [MASK]; `cls`, `sep`: the pieces the post-processor puts around a text ("[CLS] $A [SEP]").

    What it rebuilds from the model proto:
    - normalisation: the model's precompiled character map (NFKC, and case folding for our uncased
      `nmt_nfkc_cf` models), then SentencePiece's `remove_extra_whitespaces` (spaces stripped at both ends,
      runs of spaces made one);
    - pre-tokenization: spaces become "▁", a "▁" is prepended (`add_dummy_prefix`), and words split there
      (no piece spans a word boundary when the model was trained with `split_by_whitespace`);
    - the model: unigram with the pieces' scores (unknown characters: SentencePiece's unk penalty, runs of them
      fused into one [UNK]) or BPE with merges ranked by the merged piece's score (SentencePiece merges the
      best-scoring adjacent pair first), each with the model's byte fallback where it has one;
    - the special tokens as added tokens, so that their text ("[MASK]") maps to their ids, as in every Hugging
      Face tokenizer (fill-mask depends on it); our own `encode` treats such text as ordinary text instead
      (see `Tokenizer.encode_hf_batch`).
    """
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, \
        pre_tokenizers, processors

    spec = sentencepiece_model_spec(model_bytes)
    pieces = spec.pieces
    unk_id = next((i for i, (_, _, t) in enumerate(pieces) if t == SP_UNKNOWN), spec.unk_id)
    byte_fallback = spec.byte_fallback
    if spec.model_type == 1:  # unigram
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk_id, byte_fallback=byte_fallback)
    elif spec.model_type == 2:  # bpe
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        mergeable = {p: i for i, (p, _, t) in enumerate(pieces) if t in (SP_NORMAL, SP_USER_DEFINED)}
        merges = []
        for piece, i in mergeable.items():
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in mergeable and right in mergeable:
                    # Rank: the merged piece's score (higher merges first), then the left part's.
                    merges.append((-pieces[i][1], i, mergeable[left], (left, right)))
        merges.sort()
        model = models.BPE(vocab, [m[-1] for m in merges], unk_token=pieces[unk_id][0], fuse_unk=True,
                           byte_fallback=byte_fallback)
    else:
        raise DataError(f"a SentencePiece {({3: 'word', 4: 'char'}.get(spec.model_type, spec.model_type))} "
                        f"model has no Hugging Face tokenizer here (unigram and BPE have)")
    tok = HFTokenizer(model)
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        # Only " " counts, as in SentencePiece (after the character map, which turns tabs and newlines into it).
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    prepend = "always" if spec.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend,
                                                 split=spec.split_by_whitespace)
    if byte_fallback:
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1 if spec.add_dummy_prefix else 0, 0)])
    else:
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend,
                                         split=spec.split_by_whitespace)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in special_tokens])
    ids = dict(special_tokens)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, ids[cls]), (sep, ids[sep])])
    return tok


def _sentences(texts: Iterable[str], max_bytes: int) -> Iterable[str]:
    """Lines of the documents, cut to SentencePiece's sentence-length limit (longer ones it would drop)."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if line:
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def train_sentencepiece_model(texts: Iterable[str], vocab_size: int, lowercase: bool, model_type: str,
                              max_sentences: int, special_tokens: Sequence[str]) -> bytes:
    """The serialized SentencePiece model trained on the lines of `texts`, with [PAD], [UNK], [CLS], [SEP]
    (`special_tokens[:4]`) as its pad, unk, bos and eos pieces at ids 0..3 and [MASK] a control symbol (4)."""
    import sentencepiece as spm

    pad, unk, cls, sep, mask = special_tokens
    model = io.BytesIO()
    max_len = 4192
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_sentences(texts, max_len)), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=0.9995, max_sentence_length=max_len,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            pad_id=0, pad_piece=pad, unk_id=1, unk_piece=unk, bos_id=2, bos_piece=cls,
            eos_id=3, eos_piece=sep, control_symbols=[mask], hard_vocab_limit=False,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {str(e).splitlines()[0] if str(e) else e}") from None
    return model.getvalue()


# ---- byte-level BPE (RoBERTa's / GPT-2's) and any tokenizer.json ------------------------------------------------

def bytelevel_bpe_backend(vocab: dict[str, int], merges: Sequence[tuple[str, str]], lowercase: bool,
                          special_tokens: Sequence[str], cls: str, sep: str, mask: str):
    """A `tokenizers.Tokenizer` configured as RoBERTa's (the tokenizer.json transformers writes for roberta-base):
    no normaliser (a `Lowercase` one when `lowercase`), the GPT-2 byte-level pre-tokenizer without a prefix space
    (a word after a space starts with "Ġ", the first word of a text does not), BPE without an unknown token
    (every byte is in the alphabet), the special tokens as added tokens (`mask` strips the space before it, as
    RoBERTa's `<mask>` does, so fill-mask on "a <mask>" sees the same ids as "a" + "Ġword"), and `cls` ... `sep`
    around a text (a pair: `cls A sep sep B sep`)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, \
        pre_tokenizers, processors

    tok = HFTokenizer(models.BPE(dict(vocab), [tuple(m) for m in merges], continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=t == mask) for t in special_tokens])
    tok.post_processor = processors.RobertaProcessing((sep, vocab[sep]), (cls, vocab[cls]), trim_offsets=True,
                                                      add_prefix_space=False)
    return tok


def train_bytelevel_bpe(texts: Iterable[str], vocab_size: int, lowercase: bool,
                        special_tokens: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on `texts`: `special_tokens` at ids 0.., then the 256 byte
    symbols (sorted, so ids do not depend on the corpus), then one token per merge, in merge order."""
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # min_frequency=2: one-off strings (hashes, long identifiers) get no token of their own, as for WordPiece.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def read_vocab_merges(vocab_file: str, merges_file: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a GPT-2 / RoBERTa `vocab.json` + `merges.txt` pair (merges: one "a b" per line after an
    optional "#version" header)."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{vocab_file} / {merges_file}: unreadable ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise DataError(f"{vocab_file}: not a {{token: id}} JSON object")
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise DataError(f"{merges_file}:{n}: a merge is two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def read_tokenizer_spec(path: str) -> dict:
    """The JSON of a Hugging Face `tokenizer.json`; DataError when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise DataError(f"{path}: not a Hugging Face tokenizer.json (no 'model' object)")
    return spec


def word_marker(spec: dict) -> str | None:
    """The character a word-initial token starts with under the pre-tokenizer (and decoder) of a tokenizer.json
    spec: "▁" (Metaspace, SentencePiece-style), "Ġ" (ByteLevel, GPT-2 / RoBERTa), None (neither)."""
    def kinds(node):
        if not isinstance(node, dict):
            return []
        inner = node.get("pretokenizers") or node.get("decoders") or []
        return [node.get("type")] + [k for n in inner for k in kinds(n)]

    found = kinds(spec.get("pre_tokenizer")) + kinds(spec.get("decoder"))
    if "Metaspace" in found:
        return "\u2581"
    if "ByteLevel" in found:
        return "\u0120"
    return None
