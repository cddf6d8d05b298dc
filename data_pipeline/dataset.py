"""tf.data reader for pretokenized shards (the output of `data_pipeline.pretokenize`): streaming, equal
batch counts on every host, deterministic, and resumable at the cost of reading at most one window.

The stream of one process is planned in Python from the manifest alone (no data read):

    this process's shards (shards[process_index::process_count])
    epoch e: the shards in a seeded order (a fresh one each epoch), cut into WINDOWS of `window_shards`
             shards; a window's files are interleaved record by record and shuffled (buffer `shuffle_buffer`,
             seeded per (seed, epoch, window, process)); the windows follow one another.
    every epoch holds exactly `batches_per_epoch * batch_size` rows, where batches_per_epoch =
             min over ALL processes of (their rows // batch_size): every host yields the same number of
             batches, and the rows beyond that (a different few each epoch) wait for the next epoch.
    -> batch serialized records -> parse (checks each record's length) -> prefetch

A position is just "batches consumed" (`skip_batches`): the plan maps it to (epoch, window, rows into the
window) without reading anything, and only that window is read again up to the position, so resuming at
step 1,000,000 costs the same as at step 10: at most one window (with `window_shards=1`, one shard).
`window_shards` trades that bound against mixing: more shards per window mix more distant parts of the
corpus into each batch (pretokenize writes contiguous runs of documents per shard).

Bad shards: each shard is checked when its window is planned (exists, size == rows x record size from
the TFRecord framing; O(1), no read); a failing one raises DataError naming the file, or with
`skip_corrupt_shards` is left out and counted (the epoch is topped up from the other shards, so the batch
count and the resume arithmetic stay exact). Each record's length is checked when parsed, and a CRC or
truncation error met while reading is mapped to a DataError naming the shard by `as_numpy` (always an
error: rows of that shard may already be in batches, so skipping it then would not be clean).

`data_dir` may be an object-store URL (gs://...): tf.data reads it natively, the size checks go through
`data_pipeline.paths` (in threads, once: published objects do not change), each file is read in 8 MiB
requests with its records prefetched, and the next window is opened while this one is consumed (the same
order of rows as on a local disk).

TensorFlow is imported lazily (only when a dataset is built) so that `import data_pipeline.dataset` stays
cheap; TF is kept off any GPU, which belongs to JAX.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import struct
from typing import Iterator

import numpy as np

from data_pipeline import manifest as manifest_lib
from data_pipeline import paths
from data_pipeline import records
from data_pipeline.errors import DataError
from data_pipeline.manifest import Manifest

_BAD_RECORD = "bad record length in shard "
_REMOTE_READ_BYTES = 8 << 20
_REMOTE_WINDOWS_AHEAD = 4  # windows read at once from object storage (the consumer takes them in order)


def _tf():
    """TensorFlow, imported here rather than at module level: `import data_pipeline.dataset` stays cheap (the
    planner, validate and tests use it without TF), and TF is configured to stay off the GPU before first use."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    try:  # the accelerators belong to JAX; tensorflow-cpu has none, a full TF install might
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised: too late to hide, and harmless for tf.data
        pass
    return tf


@dataclasses.dataclass
class StreamStats:
    """What a stream met so far (filled by the planner, which runs ahead of the consumer by a window or so):
    `skipped_shards` (paths left out as corrupt) and `recent_windows` (the last windows' paths, to name the
    shard behind a read error)."""

    skipped_shards: list = dataclasses.field(default_factory=list)
    recent_windows: list = dataclasses.field(default_factory=list)
    error: Exception | None = None  # a DataError raised by the planner (tf.data would wrap it)
    checked: set = dataclasses.field(default_factory=set)  # object-store shards found good once: not rechecked


@dataclasses.dataclass
class Plan:
    """The deterministic layout of one process's stream; see the module docstring."""

    files: list
    rows: list
    batch_size: int
    rows_per_epoch: int
    window_shards: int
    seed: int
    process_index: int
    shuffle: bool
    skip_corrupt: bool

    @property
    def batches_per_epoch(self) -> int:
        return self.rows_per_epoch // self.batch_size

    def windows(self, epoch: int, refill: int = 0) -> list:
        """Shard indices of each window of `epoch` (refill > 0: the extra rounds that top up an epoch)."""
        order = np.arange(len(self.files))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, refill, self.process_index]).permutation(order)
        k = self.window_shards
        return [order[i:i + k].tolist() for i in range(0, len(order), k)]

    def window_seed(self, epoch: int, refill: int, window: int) -> int:
        seq = np.random.SeedSequence([self.seed, epoch, refill, window, self.process_index])
        return int(seq.generate_state(1, np.uint32)[0])

    def position(self, batches: int) -> dict:
        """Where `batches` consumed batches leave the stream (for the checkpoint meta; informative)."""
        epoch, rows = divmod(batches * self.batch_size, self.rows_per_epoch)
        return {"batches_consumed": int(batches), "epoch": int(epoch), "rows_into_epoch": int(rows),
                "seed": self.seed, "batch_size": self.batch_size, "batches_per_epoch": self.batches_per_epoch,
                "window_shards": self.window_shards}


def _shard_ok(path: str, rows: int) -> str | None:
    """None when the file's size equals `rows` TFRecord records of its first record's length (every row has
    the same size), else the reason. Reads 8 bytes: cheap enough to run on every window."""
    try:
        size = paths.getsize(path)
        with paths.open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    except Exception as e:  # noqa: BLE001  object storage: tf.errors.NotFoundError and kin are not OSErrors
        if not paths.is_remote(path):
            raise
        return f"cannot be read ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''})"
    if len(head) < 8:
        return f"is truncated ({size} bytes)"
    record = struct.unpack("<Q", head)[0] + records.HEADER_BYTES + records.FOOTER_BYTES
    if size != rows * record:
        return f"has {size} bytes, expected {rows} records of {record} = {rows * record} (truncated or corrupt)"
    return None


def _window_stream(plan: Plan, start_batch: int, repeat: bool, stats: StreamStats):
    """Yields (files, shuffle seed, rows to skip, rows to take) for each window from batch `start_batch` on."""
    bad: dict[int, bool] = {i: True for i, path in enumerate(plan.files) if path in stats.skipped_shards}
    bad.update({i: False for i, path in enumerate(plan.files) if path in stats.checked})

    def usable(i):
        if i not in bad:
            reason = _shard_ok(plan.files[i], plan.rows[i])
            if reason and not plan.skip_corrupt:
                stats.error = DataError(f"shard {plan.files[i]} {reason} (set data.skip_corrupt_shards to skip it)")
                raise stats.error
            bad[i] = reason is not None
            if reason:
                stats.skipped_shards.append(plan.files[i])
        return not bad[i]

    epoch, skip = divmod(start_batch * plan.batch_size, plan.rows_per_epoch)
    while True:
        remaining, refill = plan.rows_per_epoch, 0
        while remaining > 0:
            if refill > 0 and not any(usable(i) for i in range(len(plan.files))):
                stats.error = DataError(f"every shard of this process is corrupt ({plan.files[0]} ...)")
                raise stats.error
            for w, shards in enumerate(plan.windows(epoch, refill)):
                good = [i for i in shards if usable(i)]
                take = min(sum(plan.rows[i] for i in good), remaining)
                remaining -= take
                if skip >= take:  # before the resume point: planned, not read
                    skip -= take
                    continue
                files = [plan.files[i] for i in good]
                stats.recent_windows = (stats.recent_windows + [files])[-3:]
                yield files, plan.window_seed(epoch, refill, w), skip, take
                skip = 0
                if remaining == 0:
                    break
            refill += 1
        epoch += 1
        if not repeat:
            return


def check_shards(data_dir: str, manifest: Manifest, split: str, process_index: int = 0,
                 process_count: int = 1) -> None:
    """Raises DataError naming the first of this process's shards whose size does not match its manifest row
    count (truncated or corrupt). Reads 8 bytes per shard: run it before any compile or long work."""
    shards = manifest.split(split).shards[process_index::process_count]
    files = [paths.join(data_dir, shard.file) for shard in shards]
    for path, reason in zip(files, _map_io(lambda f, s: _shard_ok(f, s.rows), files, shards)):
        if reason:
            raise DataError(f"shard {path} {reason} (set data.skip_corrupt_shards to skip it)")


def _map_io(fn, *iterables) -> list:
    """map(fn, ...) for small I/O calls: in 16 threads when they go to object storage (each call a round
    trip of tens of ms; a dataset may have thousands of shards), in order either way."""
    args = list(zip(*iterables))
    if len(args) > 1 and args and paths.is_remote(str(args[0][0])):
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda a: fn(*a), args))
    return [fn(*a) for a in args]


def make_plan(manifest: Manifest, data_dir: str, split: str, batch_size: int, *, shuffle: bool = True,
              repeat: bool = True, seed: int = 0, process_index: int = 0, process_count: int = 1,
              drop_remainder: bool = True, window_shards: int = 1, skip_corrupt_shards: bool = False) -> Plan:
    """The stream layout of one process (no data read); raises DataError for impossible requests."""
    if split not in manifest.splits:
        raise DataError(f"{data_dir}: no split {split!r} (has {sorted(manifest.splits)})")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if window_shards < 1:
        raise DataError(f"data.window_shards must be >= 1, got {window_shards}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    all_shards = manifest.splits[split].shards
    shards = all_shards[process_index::process_count]
    if not shards:
        raise DataError(f"{data_dir}: split {split!r} has {len(all_shards)} shards, "
                        f"fewer than the {process_count} processes (re-run pretokenize with --num-shards)")
    rows = [s.rows for s in shards]
    if sum(rows) == 0:
        raise DataError(f"{data_dir}: split {split!r} has no rows for process {process_index}")
    # Every process must yield the same number of batches: the epoch is cut to the smallest host's.
    per_host = [manifest.splits[split].host_rows(h, process_count) for h in range(process_count)]
    fewest = min(per_host)
    if repeat or drop_remainder:
        if fewest < batch_size:
            raise DataError(f"{data_dir}: split {split!r} has {fewest} rows for process "
                            f"{per_host.index(fewest)}, fewer than one batch of {batch_size}")
        rows_per_epoch = fewest // batch_size * batch_size
    else:  # one pass over everything, the last batch smaller (evaluation of a whole split on one host)
        rows_per_epoch = sum(rows)
    return Plan(files=[paths.join(data_dir, s.file) for s in shards], rows=rows, batch_size=batch_size,
                rows_per_epoch=rows_per_epoch, window_shards=min(window_shards, len(shards)), seed=seed,
                process_index=process_index, shuffle=shuffle, skip_corrupt=skip_corrupt_shards)


def make_dataset(data_dir: str, split: str, batch_size: int, *, shuffle: bool = True, repeat: bool = True,
                 seed: int = 0, shuffle_buffer: int = 10_000, process_index: int = 0, process_count: int = 1,
                 skip_batches: int = 0, drop_remainder: bool = True, window_shards: int = 1,
                 skip_corrupt_shards: bool = False, record_counter=None):
    """A `tf.data.Dataset` of dicts `{"input_ids", "attention_mask", "token_type_ids"}`, each int32.

    Shapes are `[batch_size, seq_len]` (the last batch may be smaller only with `repeat=False,
    drop_remainder=False`). `attention_mask` is `input_ids != pad_id`; `token_type_ids` are zeros (the
    documents of a packed row are told apart by their [CLS], see bert_jax.models.encoder.document_features).
    With `shuffle=False` the shards and rows come in packed (file) order. `skip_batches=k` starts at batch
    k of the stream the same arguments would otherwise produce, reading at most one window to get there.
    `record_counter`: an int64 tf.Variable incremented per record read from disk (tests, benchmarks).
    The returned dataset carries `.stream_stats` (a StreamStats) and `.plan`; iterate it with `as_numpy`.
    """
    manifest = manifest_lib.load(data_dir)
    plan = make_plan(manifest, data_dir, split, batch_size, shuffle=shuffle, repeat=repeat, seed=seed,
                     process_index=process_index, process_count=process_count, drop_remainder=drop_remainder,
                     window_shards=window_shards, skip_corrupt_shards=skip_corrupt_shards)
    stats = StreamStats()
    remote = paths.is_remote(data_dir)
    if not skip_corrupt_shards:
        check_shards(data_dir, manifest, split, process_index, process_count)
        good = plan.files
    else:  # known (and counted) from the start; a shard that goes bad later is caught when planned
        stats.skipped_shards = [p for p, bad in zip(plan.files, _map_io(_shard_ok, plan.files, plan.rows)) if bad]
        good = [p for p in plan.files if p not in stats.skipped_shards]
    if remote:  # an object never changes once published: checked once here (in threads), not per window
        stats.checked = set(good)
    tf = _tf()
    cycle = plan.window_shards

    def read_file(path):
        # Object storage: bigger reads (each a ranged GET) and records prefetched per file, so the latency
        # of the next block overlaps the shuffle and parse of this one (interleave reads files in parallel).
        ds = tf.data.TFRecordDataset(path, buffer_size=_REMOTE_READ_BYTES if remote else None)
        if remote:
            ds = ds.prefetch(tf.data.AUTOTUNE)
        if record_counter is not None:
            ds = ds.map(lambda r: (record_counter.assign_add(1), r)[1])
        return ds.map(lambda r: (r, path))

    def window(files, shuffle_seed, skip, take):
        files_ds = tf.data.Dataset.from_tensor_slices(files)
        if cycle > 1:  # record by record from each file: rows from distant parts of the corpus meet
            ds = files_ds.interleave(read_file, cycle_length=cycle, block_length=1, num_parallel_calls=cycle,
                                     deterministic=True)
        else:
            ds = files_ds.flat_map(read_file)
        if shuffle:
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed)
        return ds.take(take).skip(skip)

    ds = tf.data.Dataset.from_generator(
        lambda: _window_stream(plan, skip_batches, repeat, stats),
        output_signature=(tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int64),
                          tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)))
    if remote:
        # The next window's files open and fill its shuffle buffer while this window is consumed. A block is a
        # whole window (no window holds more rows than `block`), so the order is exactly flat_map's.
        block = plan.window_shards * max(plan.rows)
        ds = ds.interleave(window, cycle_length=_REMOTE_WINDOWS_AHEAD, block_length=block,
                           num_parallel_calls=_REMOTE_WINDOWS_AHEAD, deterministic=True)
    else:
        ds = ds.flat_map(window)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(_batch_parser(tf, manifest, batch_size, drop_remainder), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    ds.stream_stats, ds.plan = stats, plan
    return ds


def _batch_parser(tf, manifest: Manifest, batch_size: int, drop_remainder: bool):
    """parse(serialized records [b], their shard paths [b]) -> the batch dict of `make_dataset`."""
    seq_len, pad_id = manifest.seq_len, manifest.special_ids.pad
    raw_dtype = tf.uint16 if manifest.dtype == "uint16" else tf.int32
    row_bytes = seq_len * (2 if manifest.dtype == "uint16" else 4)

    def parse(serialized, paths):
        features = tf.io.parse_example(serialized, {"input_ids": tf.io.FixedLenFeature([], tf.string)})
        raw = features["input_ids"]
        bad = tf.not_equal(tf.strings.length(raw), row_bytes)
        # Never a silent wrong batch: a record of another length names its shard in the error.
        check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)),
                                    [tf.strings.join([_BAD_RECORD, tf.boolean_mask(paths, bad)[:1]])])
        with tf.control_dependencies([check]):
            ids = tf.io.decode_raw(raw, raw_dtype, little_endian=True)
        ids = tf.reshape(tf.cast(ids, tf.int32), [-1, seq_len])
        if drop_remainder:  # a static batch dimension lets the consumer rely on fixed shapes
            ids = tf.ensure_shape(ids, [batch_size, seq_len])
        return {"input_ids": ids,
                "attention_mask": tf.cast(tf.not_equal(ids, pad_id), tf.int32),
                "token_type_ids": tf.zeros_like(ids)}

    return parse


def _find_bad_shard(stats: StreamStats | None, plan: Plan | None) -> str | None:
    """The first shard of the recent windows that does not read back cleanly with its manifest row count."""
    if stats is None or plan is None:
        return None
    tf = _tf()
    expected = dict(zip(plan.files, plan.rows))
    for files in reversed(stats.recent_windows):
        for path in files:
            try:
                n = int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda c, _: c + 1))
            except tf.errors.OpError:
                return path
            if n != expected.get(path, n):
                return path
    return None


def as_numpy(ds, stats: StreamStats | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Iterate a dataset from `make_dataset` as dicts of np.int32 arrays. A corrupt or truncated shard met
    while reading raises DataError naming the file (`stats` defaults to the dataset's own)."""
    tf = _tf()
    stats = stats if stats is not None else getattr(ds, "stream_stats", None)
    plan = getattr(ds, "plan", None)
    it = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            if stats is not None and stats.error is not None:  # raised by the planner, wrapped by tf.data
                raise stats.error from None
            _raise_data_error(e, stats, plan)
        yield batch


def _raise_data_error(e, stats: StreamStats | None, plan: Plan | None):
    """Maps a tf.data error met while reading to a one-line DataError naming the shard (or re-raises)."""
    tf = _tf()
    if isinstance(e, tf.errors.InvalidArgumentError):
        found = re.search(re.escape(_BAD_RECORD) + r"(\S+?)[\]\s'\"]", str(e))
        if not found:
            raise e
        raise DataError(f"shard {found.group(1)} holds a record of the wrong length (corrupt)") from None
    if isinstance(e, tf.errors.DataLossError):
        path = _find_bad_shard(stats, plan)
        what = str(e).split("}}")[-1].split("[Op:")[0].strip()
        raise DataError(f"shard {path or '(one of this process shards)'} is corrupt or truncated: {what}") from None
    raise e
