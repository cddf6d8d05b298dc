"""Tests for data_pipeline.dataset: text -> shards -> batches, determinism, resume, per-process shards."""

import json
import os
import shutil

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline.dataset import as_numpy, load_manifest, make_dataset
from data_pipeline.packing import pack_documents
from data_pipeline.pretokenize import _write_shards, pretokenize
from data_pipeline.sources import docstring_documents
from data_pipeline.tokenization import Tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 4-shard train split of real docstrings and the rows it should contain, in packed order."""
    docs = docstring_documents(include_site_packages=False, max_documents=600,
                               cache_dir=str(tmp_path_factory.getbasetemp() / "docstrings"))
    src = tmp_path_factory.mktemp("src") / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = str(tmp_path_factory.mktemp("data"))
    pretokenize(str(src), out, vocab_size=500, seq_len=SEQ, validation_fraction=0.0, num_shards=4,
                overwrite=True)
    tok = Tokenizer.load(os.path.join(out, "tokenizer"))
    rows = np.stack(list(pack_documents(tok.encode_batch(docs), SEQ, tok.cls_id, tok.sep_id, tok.pad_id)))
    return out, rows


def batches(ds, n=None):
    out = []
    for i, b in enumerate(as_numpy(ds)):
        if n is not None and i >= n:
            break
        out.append(b)
    return out


def test_reads_back_packed_rows_in_order(data):
    out, rows = data
    assert len(rows) > 100
    got = batches(make_dataset(out, "train", 16, shuffle=False, repeat=False, drop_remainder=False))
    ids = np.concatenate([b["input_ids"] for b in got])
    np.testing.assert_array_equal(ids, rows)
    for b in got:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(v.dtype == np.int32 for v in b.values())
        np.testing.assert_array_equal(b["attention_mask"], (b["input_ids"] != 0).astype(np.int32))
        assert not b["token_type_ids"].any()
    assert got[-1]["input_ids"].shape[0] == len(rows) % 16 or len(rows) % 16 == 0
    dropped = batches(make_dataset(out, "train", 16, shuffle=False, repeat=False))
    assert len(dropped) == len(rows) // 16


def test_static_shapes(data):
    out, _ = data
    spec = make_dataset(out, "train", 8).element_spec
    assert {k: tuple(v.shape) for k, v in spec.items()} == {k: (8, SEQ) for k in spec}


def test_same_seed_same_batches_other_seed_other_order(data):
    out, rows = data
    # 3 epochs' worth of batches, so reshuffling across repeats is covered too.
    n = 3 * len(rows) // 8
    a = np.stack([b["input_ids"] for b in batches(make_dataset(out, "train", 8, seed=1), n)])
    b = np.stack([b["input_ids"] for b in batches(make_dataset(out, "train", 8, seed=1), n)])
    c = np.stack([b["input_ids"] for b in batches(make_dataset(out, "train", 8, seed=2), n)])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    first_epoch = a.reshape(-1, SEQ)[:len(rows) // 8 * 8]
    assert not np.array_equal(first_epoch, rows[:len(first_epoch)])  # actually shuffled
    # One epoch of shuffled rows is a permutation of the split (up to the dropped remainder).
    one = np.concatenate([x["input_ids"] for x in batches(make_dataset(out, "train", 1, seed=3, repeat=False))])
    assert sorted(map(bytes, one)) == sorted(map(bytes, rows))


def test_skip_batches_resumes_exactly(data):
    out, _ = data
    full = batches(make_dataset(out, "train", 8, seed=5, shuffle_buffer=50), 40)
    resumed = batches(make_dataset(out, "train", 8, seed=5, shuffle_buffer=50, skip_batches=25), 15)
    for x, y in zip(full[25:], resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert len(resumed) == 15


def test_processes_get_disjoint_shards(data):
    out, rows = data
    parts = []
    for index in range(2):
        ds = make_dataset(out, "train", 4, shuffle=False, repeat=False, drop_remainder=False,
                          process_index=index, process_count=2)
        parts.append(np.concatenate([b["input_ids"] for b in as_numpy(ds)]))
    shards = load_manifest(out)["splits"]["train"]["shards"]
    assert len(parts[0]) == shards[0]["rows"] + shards[2]["rows"]
    assert not set(map(bytes, parts[0])) & set(map(bytes, parts[1]))
    assert sorted(map(bytes, np.concatenate(parts))) == sorted(map(bytes, rows))
    with pytest.raises(DataError, match="fewer than the 5 processes"):
        make_dataset(out, "train", 4, process_index=4, process_count=5)


def test_split_errors(data):
    out, rows = data
    with pytest.raises(DataError, match="split 'validation' has no rows"):
        make_dataset(out, "validation", 4)
    with pytest.raises(DataError, match="no split 'test'"):
        make_dataset(out, "test", 4)
    with pytest.raises(DataError, match="fewer than one batch"):
        make_dataset(out, "train", len(rows) + 1, repeat=False)


def test_bad_directories(data, tmp_path):
    out, _ = data
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="has no manifest.json"):
        make_dataset(str(tmp_path), "train", 4)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: invalid JSON"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(DataError, match="format is 'something.else'"):
        load_manifest(str(tmp_path))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    os.remove(copy / "train-00002-of-00004.tfrecord")
    with pytest.raises(DataError, match="shard 'train-00002-of-00004.tfrecord' of split 'train' is missing"):
        load_manifest(str(copy))


def test_int32_rows_for_large_vocabularies(data, tmp_path):
    out, rows = data
    big = rows.copy()
    big[:, 1] = 70_000 + np.arange(len(rows))  # ids beyond uint16
    manifest = load_manifest(out)
    manifest["dtype"] = "int32"
    manifest["splits"] = {"train": {"rows": len(big), "shards": _write_shards(big, "train", str(tmp_path), 2,
                                                                              "int32", 0)}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ds = make_dataset(str(tmp_path), "train", 10, shuffle=False, repeat=False, drop_remainder=False)
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in as_numpy(ds)]), big)
