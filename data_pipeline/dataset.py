"""tf.data reader for pretokenized shards (the output of `data_pipeline.pretokenize`).

Pipeline, per process:

    this process's shards (shards[process_index::process_count])
    -> [shuffle file order] -> interleave TFRecordDataset over files (deterministic)
    -> [shuffle rows] -> [repeat] -> batch serialized records -> skip(skip_batches)
    -> parse + decode the whole batch at once -> prefetch

Skipping happens on serialized batches, before parsing, so resuming at batch k costs reading k batches'
bytes but no decoding. Everything is seeded and `options.deterministic = True`, so the same arguments give
the same batches in the same order on every run, which is what makes `skip_batches` an exact resume.

TensorFlow is imported lazily (only when a dataset is built) so that `import data_pipeline.dataset` stays
cheap; TF is kept off any GPU, which belongs to JAX.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

from data_pipeline.errors import DataError

FORMAT = "bert_jax.pretokenized.v1"
_REQUIRED_KEYS = ("seq_len", "vocab_size", "dtype", "special_ids", "splits")


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    try:  # the accelerators belong to JAX; tensorflow-cpu has none, a full TF install might
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised: too late to hide, and harmless for tf.data
        pass
    return tf


def load_manifest(data_dir: str) -> dict:
    """The parsed `data_dir/manifest.json`, after checking its format and that every listed shard exists.

    Raises DataError (one line, naming the path) when anything is missing or malformed.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist")
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise DataError(f"{data_dir!r} has no manifest.json (not a pretokenized dataset, or unfinished)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    if manifest["dtype"] not in ("uint16", "int32"):
        raise DataError(f"{path}: dtype {manifest['dtype']!r} is neither 'uint16' nor 'int32'")
    for split, info in manifest["splits"].items():
        for shard in info.get("shards", []):
            if not os.path.isfile(os.path.join(data_dir, shard["file"])):
                raise DataError(f"{path}: shard {shard['file']!r} of split {split!r} is missing")
    return manifest


def make_dataset(data_dir: str, split: str, batch_size: int, *, shuffle: bool = True, repeat: bool = True,
                 seed: int = 0, shuffle_buffer: int = 10_000, process_index: int = 0, process_count: int = 1,
                 skip_batches: int = 0, drop_remainder: bool = True):
    """A `tf.data.Dataset` of dicts `{"input_ids", "attention_mask", "token_type_ids"}`, each int32.

    Shapes are `[batch_size, seq_len]` (the last batch may be smaller only with `drop_remainder=False`).
    `attention_mask` is `input_ids != pad_id`; `token_type_ids` are zeros (packed rows have one segment).
    With `shuffle=False, repeat=False` the split is read exactly once in packed (file) order.
    `skip_batches=k` starts at batch k of the stream the same arguments would otherwise produce.
    """
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} (has {sorted(manifest['splits'])})")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    shards = manifest["splits"][split]["shards"][process_index::process_count]
    if not shards:
        raise DataError(f"{data_dir}: split {split!r} has {len(manifest['splits'][split]['shards'])} shards, "
                        f"fewer than the {process_count} processes (re-run pretokenize with --num-shards)")
    rows = sum(s["rows"] for s in shards)
    if rows == 0:
        raise DataError(f"{data_dir}: split {split!r} has no rows for process {process_index}")
    if not repeat and drop_remainder and rows < batch_size:
        raise DataError(f"{data_dir}: split {split!r} has {rows} rows for process {process_index}, "
                        f"fewer than one batch of {batch_size}")

    tf = _tf()
    seq_len = int(manifest["seq_len"])
    pad_id = int(manifest["special_ids"]["pad"])
    raw_dtype = tf.uint16 if manifest["dtype"] == "uint16" else tf.int32
    files = [os.path.join(data_dir, s["file"]) for s in shards]

    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        # Reading several files at once mixes distant parts of the corpus before the row shuffle buffer.
        cycle = min(len(files), 8)
    else:
        cycle = 1  # one file after the other: the packed order
    if cycle > 1:
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=cycle, block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=1)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if skip_batches:
        ds = ds.skip(skip_batches)

    def parse(serialized):
        features = tf.io.parse_example(serialized, {"input_ids": tf.io.FixedLenFeature([], tf.string)})
        ids = tf.io.decode_raw(features["input_ids"], raw_dtype, little_endian=True)
        ids = tf.reshape(tf.cast(ids, tf.int32), [-1, seq_len])
        if drop_remainder:  # a static batch dimension lets the consumer rely on fixed shapes
            ids = tf.ensure_shape(ids, [batch_size, seq_len])
        return {"input_ids": ids,
                "attention_mask": tf.cast(tf.not_equal(ids, pad_id), tf.int32),
                "token_type_ids": tf.zeros_like(ids)}

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def as_numpy(ds) -> Iterator[dict[str, np.ndarray]]:
    """Iterate a dataset from `make_dataset` as dicts of np.int32 arrays."""
    return ds.as_numpy_iterator()
