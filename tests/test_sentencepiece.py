"""Tests for SentencePiece tokenizers (data_pipeline.tokenization) and pretokenizing with them."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import DataError, validate
from data_pipeline import manifest as manifest_lib
from data_pipeline.dataset import as_numpy, make_dataset
from data_pipeline.packing import pack_documents
from data_pipeline.sources import docstring_documents
from data_pipeline.splitting import split_of
from data_pipeline.tokenization import SPECIAL_TOKENS, SentencePieceTokenizer, Tokenizer
from data_pipeline.tokenizer_training import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return docstring_documents(include_site_packages=False, max_documents=1200,
                               cache_dir=str(tmp_path_factory.getbasetemp() / "docstrings"))


@pytest.fixture(scope="module", params=["sentencepiece-unigram", "sentencepiece-bpe"])
def trained(request, docs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(request.param))
    assert train_tokenizer(request.param, docs, 600, out) == out
    return request.param, out


def test_layout_ids_and_roundtrip(trained, docs, tmp_path):
    import sentencepiece as spm

    kind, out = trained
    tok = Tokenizer.load(out)  # a folder with spm.model loads as SentencePiece
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer) and tok.kind == kind
    assert sorted(os.listdir(out)) == sorted(tok.files)
    assert tok.vocab_size == 600
    assert [tok.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == (0, 1, 2, 3, 4)
    with open(os.path.join(out, "spm.model"), "rb") as f:
        assert tok.vocab_hash == hashlib.sha256(f.read()).hexdigest()
    # Ids are exactly sentencepiece's own encoding with the same model file.
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spm.model"))
    ids = tok.encode_batch(docs[:300])
    assert ids == [sp.encode(d) for d in docs[:300]] and sum(map(len, ids)) > 10_000
    assert not {0, 2, 3, 4} & set(i for x in ids for i in x)  # no specials from text
    assert tok.encode("a [MASK] b") != tok.encode("a b") and tok.mask_id not in tok.encode("a [MASK] b")
    assert tok.decode(tok.encode("return the value")) == "return the value"
    assert tok.decode([tok.cls_id] + tok.encode("the value") + [tok.sep_id], skip_special_tokens=True) == "the value"
    assert tok.encode("Return THE Value") == tok.encode("return the value")  # uncased by default
    assert tok.token_to_id("[MASK]") == 4 and tok.token_to_id("no-such-piece-xyz") is None
    # Word starts: pieces with the "▁" prefix, and the specials.
    mask = tok.word_start_mask()
    assert mask.shape == (600,) and mask[:5].all()
    assert all(mask[i] == tok.id_to_token(i).startswith("\u2581") for i in range(5, 600))
    assert 0 < mask.sum() < 600
    # Saving copies the exact model; loading the .model path directly works too.
    again = Tokenizer.load(os.path.join(tok.save(str(tmp_path / "copy")), "spm.model"))
    assert again.vocab_hash == tok.vocab_hash and again.encode_batch(docs[:50]) == ids[:50]


def test_model_spec_reads_the_proto_as_sentencepiece_does(trained, docs):
    """tokenizer_backends.sentencepiece_model_spec (our own protobuf reader, no sentencepiece_model_pb2) gives
    every piece, score and type as SentencePiece's processor reports them, and the trainer/normalizer fields."""
    import sentencepiece as spm
    from data_pipeline import tokenizer_backends as backends

    kind, out = trained
    with open(os.path.join(out, "spm.model"), "rb") as f:
        model = f.read()
    sp = spm.SentencePieceProcessor(model_proto=model)
    spec = backends.sentencepiece_model_spec(model)
    assert len(spec.pieces) == sp.get_piece_size() == 600
    assert [p for p, _, _ in spec.pieces] == [sp.id_to_piece(i) for i in range(600)]
    assert [s for _, s, _ in spec.pieces] == [sp.get_score(i) for i in range(600)]
    types = [t for _, _, t in spec.pieces]
    assert [i for i, t in enumerate(types) if t == 2] == [i for i in range(600) if sp.is_unknown(i)] == [1]
    assert [i for i, t in enumerate(types) if t == 3] == [i for i in range(600) if sp.is_control(i)] == [0, 2, 3, 4]
    assert [i for i, t in enumerate(types) if t not in (1, 2, 3)] == []
    assert spec.model_type == {"sentencepiece-unigram": 1, "sentencepiece-bpe": 2}[kind]
    assert (spec.unk_id, spec.byte_fallback, spec.split_by_whitespace) == (1, False, True)
    assert spec.normalizer_name == "nmt_nfkc_cf" and len(spec.precompiled_charsmap) > 1000
    assert spec.add_dummy_prefix and spec.remove_extra_whitespaces
    with pytest.raises(ValueError, match="truncated"):
        backends.sentencepiece_model_spec(model[:-1])


def test_cased(docs, tmp_path):
    out = train_tokenizer("sentencepiece-unigram", docs[:600], 400, str(tmp_path / "c"), lowercase=False)
    tok = Tokenizer.load(out)
    assert tok.lowercase is False and tok.encode("Hello") != tok.encode("hello")
    with pytest.raises(DataError, match="the model is cased, but a uncased tokenizer"):
        Tokenizer.load(out, lowercase=True)


def test_bad_model_files(tmp_path):
    (tmp_path / "x.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="x.model: not a SentencePiece model"):
        Tokenizer.load(str(tmp_path / "x.model"))
    with pytest.raises(DataError, match="no SentencePiece model at .*missing.model"):
        Tokenizer.load(str(tmp_path / "missing.model"))
    import io

    import sentencepiece as spm
    model = io.BytesIO()  # a model without BERT's special pieces ([CLS], [SEP], [MASK])
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50 + ["a b c d e f g"] * 50),
                                   model_writer=model, vocab_size=17,
                                   minloglevel=2)
    (tmp_path / "plain.model").write_bytes(model.getvalue())
    with pytest.raises(DataError, match=r"plain.model: SentencePiece model lacks the special pieces "
                                        r"\['\[PAD\]', '\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
        Tokenizer.load(str(tmp_path / "plain.model"))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "data_pipeline.pretokenize", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_and_loads_sentencepiece(docs, tmp_path):
    import sentencepiece as spm

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    r = run_cli("--source", str(src), "--out", str(out), "--tokenizer", "sentencepiece-bpe", "--vocab-size", "500",
                "--seq-len", "48", "--validation-fraction", "0.1", "--cased", "--workers", "2")
    assert r.returncode == 0, r.stderr
    manifest = manifest_lib.load(str(out))
    assert manifest.tokenizer.type == "sentencepiece-bpe" and manifest.lowercase is False
    assert manifest.vocab_size == 500 and manifest.dtype == "uint16"
    assert manifest.special_ids.to_json() == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    model = out / "tokenizer" / "spm.model"
    assert manifest.vocab_hash == hashlib.sha256(model.read_bytes()).hexdigest()
    assert manifest.tokenizer.sha256["spm.model"] == manifest.vocab_hash
    assert validate.check(str(out)) == []
    # The rows are sentencepiece's own ids, packed (read back in file order by the reader training uses).
    sp = spm.SentencePieceProcessor(model_file=str(model))
    train = [d for d in docs if split_of(d, 0.1) == "train"]
    expected = list(pack_documents([sp.encode(d) for d in train], 48, 2, 3, 0))
    ds = make_dataset(str(out), "train", 16, shuffle=False, repeat=False, drop_remainder=False)
    got = [r for b in as_numpy(ds) for r in b["input_ids"]]
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))

    # An existing .model: the kind and case come from the model; a mismatching --tokenizer is refused.
    r = run_cli("--source", str(src), "--out", str(tmp_path / "o2"), "--vocab", str(model), "--seq-len", "48",
                "--validation-fraction", "0.1", "--workers", "1")
    assert r.returncode == 0, r.stderr
    again = manifest_lib.load(str(tmp_path / "o2"))
    assert again.splits == manifest.splits and again.vocab_hash == manifest.vocab_hash
    r = run_cli("--source", str(src), "--out", str(tmp_path / "o3"), "--vocab", str(model), "--tokenizer", "wordpiece")
    assert r.returncode == 1 and r.stderr.startswith("error: --tokenizer wordpiece does not match")
    assert not (tmp_path / "o3").exists()
