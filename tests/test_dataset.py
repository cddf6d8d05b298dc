"""Tests for data_pipeline.dataset: text -> shards -> batches, determinism, resume, per-process shards."""

import dataclasses
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline.dataset import as_numpy, make_dataset
from data_pipeline.manifest import Split, load as load_manifest, write as write_manifest
from data_pipeline.packing import pack_documents
from data_pipeline.pretokenize import pretokenize
from tests.helpers import write_shards
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
    # Shards are contiguous runs of the packed rows; unshuffled, process i reads shards i, i + 2 in order.
    # (Rows are compared by position, not content: real docstrings pack into a few identical rows.)
    shard_rows = np.split(rows, np.cumsum([s.rows for s in load_manifest(out).splits["train"].shards])[:-1])
    np.testing.assert_array_equal(parts[0], np.concatenate([shard_rows[0], shard_rows[2]]))
    np.testing.assert_array_equal(parts[1], np.concatenate([shard_rows[1], shard_rows[3]]))
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
    shards = tuple(write_shards(big, "train", str(tmp_path), 2, "int32", 0))
    write_manifest(str(tmp_path), dataclasses.replace(load_manifest(out), dtype="int32",
                                                      splits={"train": Split(rows=len(big), shards=shards)}))
    ds = make_dataset(str(tmp_path), "train", 10, shuffle=False, repeat=False, drop_remainder=False)
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in as_numpy(ds)]), big)


def _ids(ds, n=None):
    return np.concatenate([b["input_ids"] for b in batches(ds, n)])


def test_every_host_yields_the_same_batches_and_epochs_reshuffle(data):
    out, _ = data
    shards = load_manifest(out).splits["train"].shards
    per_host = [sum(s.rows for s in shards[h::3]) for h in range(3)]  # host 0 holds 2 shards, others 1
    assert per_host[0] > max(per_host[1:])
    counts = [len(batches(make_dataset(out, "train", 8, repeat=False, process_index=h, process_count=3)))
              for h in range(3)]
    assert counts == [min(per_host) // 8] * 3
    epoch = min(per_host) // 8 * 8
    ds = make_dataset(out, "train", 8, seed=4, process_index=0, process_count=3)
    assert ds.plan.batches_per_epoch == counts[0]
    rows = _ids(ds, 3 * counts[0])
    epochs = [rows[i * epoch:(i + 1) * epoch] for i in range(3)]
    # Multisets of rows: real docstrings pack into a few identical rows.
    mine = Counter(map(bytes, _ids(make_dataset(out, "train", 1, shuffle=False, repeat=False, process_index=0,
                                                process_count=3, drop_remainder=False))))
    assert mine.total() == per_host[0]
    for e in epochs:
        assert len(e) == epoch and Counter(map(bytes, e)) <= mine  # no row more often than the host holds it
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # The leftover rows differ between epochs: every row of the host is seen within a few epochs.
    seen = Counter()
    for e in epochs:
        seen |= Counter(map(bytes, e))
    assert seen.total() > epoch


@pytest.mark.parametrize("window_shards", [1, 3])
def test_resume_far_away_equals_the_uninterrupted_stream_and_reads_one_window(data, window_shards):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    out, _ = data
    kw = dict(seed=7, shuffle_buffer=64, window_shards=window_shards)
    plan = make_dataset(out, "train", 8, **kw).plan
    bpe = plan.batches_per_epoch
    full = batches(make_dataset(out, "train", 8, **kw), 2 * bpe + 10)
    for start in (bpe - 1, bpe + bpe // 2, 2 * bpe + 3):  # across an epoch end, mid-epoch, a later epoch
        resumed = batches(make_dataset(out, "train", 8, skip_batches=start, **kw), 7)
        np.testing.assert_array_equal(np.stack([b["input_ids"] for b in resumed]),
                                      np.stack([b["input_ids"] for b in full[start:start + 7]]))
    # Resuming a million batches in reads only (part of) the window it lands in, plus the read-ahead.
    window_rows = max(sum(plan.rows[i] for i in w) for e in range(3) for w in plan.windows(e))
    for start in (5, 1_000_000 * bpe + bpe // 2):
        counter = tf.Variable(0, dtype=tf.int64)
        ds = make_dataset(out, "train", 8, skip_batches=start, record_counter=counter, **kw)
        next(iter(as_numpy(ds)))
        assert int(counter.numpy()) <= window_rows + 8 * 16, (start, int(counter.numpy()), window_rows)
    assert plan.position(1_000_000 * bpe + 3)["epoch"] == 1_000_000


def _damaged_copy(out, tmp_path, how):
    """A copy of the data with train shard 1 damaged: 'truncate' (cut mid-record) or 'flip' (one bit of a
    record's data flipped, same size: only the CRC can tell)."""
    copy = tmp_path / how
    shutil.copytree(out, copy)
    path = copy / "train-00001-of-00004.tfrecord"
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        raw = raw[:len(raw) // 2 + 5]
    else:
        raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    return str(copy)


def test_truncated_shard_is_named_or_skipped_and_counted(data, tmp_path):
    out, _ = data
    bad = _damaged_copy(out, tmp_path, "truncate")
    with pytest.raises(DataError, match=r"train-00001-of-00004.tfrecord has \d+ bytes, expected"):
        make_dataset(bad, "train", 8)
    ds = make_dataset(bad, "train", 8, skip_corrupt_shards=True, seed=1)
    good = make_dataset(out, "train", 8, seed=1)
    assert ds.plan.batches_per_epoch == good.plan.batches_per_epoch
    rows = _ids(ds, 2 * ds.plan.batches_per_epoch)  # two full epochs: topped up from the other shards
    assert ds.stream_stats.skipped_shards == [os.path.join(bad, "train-00001-of-00004.tfrecord")]
    everything = _ids(make_dataset(out, "train", 1, shuffle=False, repeat=False))
    shards = load_manifest(out).splits["train"].shards
    lo = shards[0].rows
    kept = Counter(map(bytes, everything)) - Counter(map(bytes, everything[lo:lo + shards[1].rows]))
    assert all(kept[r] for r in map(bytes, rows))  # no row that only the skipped shard holds
    assert len(rows) == 2 * ds.plan.rows_per_epoch


def test_corrupt_record_or_wrong_length_names_the_shard(data, tmp_path):
    out, _ = data
    bad = _damaged_copy(out, tmp_path, "flip")
    with pytest.raises(DataError, match=r"shard \S+train-00001-of-00004.tfrecord is corrupt or truncated"):
        batches(make_dataset(bad, "train", 8, shuffle=False, repeat=False))
    # Records of another length than the manifest's rows (here: uint16 rows read as int32): named, not reshaped.
    wrong = tmp_path / "wrong"
    shutil.copytree(out, wrong)
    write_manifest(str(wrong), dataclasses.replace(load_manifest(str(wrong)), dtype="int32", seq_len=SEQ // 4))
    with pytest.raises(DataError, match=r"shard \S+train-0000\d-of-00004.tfrecord holds a record of the wrong"):
        batches(make_dataset(str(wrong), "train", 8, shuffle=False, repeat=False))
