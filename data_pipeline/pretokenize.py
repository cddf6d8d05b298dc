"""Pretokenize a text source into packed TFRecord shards plus a manifest (function and CLI).

    python -m data_pipeline.pretokenize --source docstrings --out DIR --vocab-size 8000 --seq-len 128

Steps: stream documents -> assign each to train/validation by a stable hash of its text -> train a
tokenizer on the train documents only (WordPiece or SentencePiece), or load `--vocab` -> per split:
encode batches of documents in a process pool (results in input order) -> pack into `[CLS] ... [SEP]`
rows -> write parts of `--shard-rows` rows -> name the finished shards
`DIR/{split}-{i:05d}-of-{n:05d}.tfrecord` -> write `DIR/manifest.json`.

Memory stays flat: documents are streamed (the source is read once per split, plus once to train a
tokenizer), at most a few batches are in flight, and rows go to disk as a part fills.

Resumable and idempotent: each part restarts packing at a document boundary, is written under a
temporary name and renamed when complete, and `DIR/progress.json` then records it with the number of
documents it consumed. A killed run restarted with the same arguments skips those documents and goes on,
giving bitwise the same shards as an uninterrupted run. A finished directory (with its manifest) is left
untouched by a re-run with the same arguments; other arguments are refused unless `--overwrite`.
The output does not depend on the number of worker processes.

Each record is a `tf.train.Example` with the bytes feature `input_ids`: the row as little-endian uint16
(int32 for vocabularies above 65536 tokens), 2 bytes per token instead of the ~3-5 of a varint int64
list. Shards hold contiguous runs of rows, so reading them in file order gives back the packed order.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from typing import Iterable, Iterator, Mapping

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.packing import pack_documents
from data_pipeline.progress import progress
from data_pipeline.sources import iter_documents, source_bytes, split_of
from data_pipeline.tokenization import Tokenizer, train_tokenizer

FORMAT = "bert_jax.pretokenized.v1"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")
TOKENIZERS = ("wordpiece", "sentencepiece-unigram", "sentencepiece-bpe")
MAX_ROWS_PER_SHARD = 50_000
_SHARD_RE = re.compile(r"^(train|validation)-(\d{5}-of-\d{5}|part-\d{5})\.tfrecord(\.tmp)?$")
_BATCH_DOCS = 256  # documents per worker task: large enough to amortise the inter-process hop
_WRITE_BATCH = 1024  # rows checksummed and written together


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def part_name(split: str, index: int) -> str:
    return f"{split}-part-{index:05d}.tfrecord"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a reader (or a restart) sees the old or the new file, never half of one


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}); pass --overwrite to start over") from None


def _clear_tool_files(out_dir: str) -> None:
    """Remove only the files this tool writes (shards, parts, progress, tokenizer): never anything else."""
    import shutil  # pylint: disable=import-outside-toplevel

    for name in (MANIFEST, PROGRESS):  # the manifest first: a crash below never leaves one next to missing shards
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if _SHARD_RE.match(name) or name.endswith(".json.tmp"):
            os.remove(path)
        elif name == TOKENIZER_DIR and os.path.isdir(path):
            shutil.rmtree(path)


# ---- records: a hand-encoded tf.train.Example (one bytes feature per row field) ----------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=16)
def _example_prefix(key: str, nbytes: int) -> bytes:
    """The bytes of an Example with one bytes feature `key` of `nbytes` bytes, up to the value itself."""
    shell = _field(1, _field(1, _field(1, key.encode()) + _field(2, _field(1, _field(1, b"\0" * nbytes)))))
    return shell[:-nbytes]


def serialize_row(row, dtype: str) -> bytes:
    """`tf.train.Example` bytes of one packed row: an array is the `input_ids` feature; a mapping (if the packer
    yields several fields per row) gives one feature per key, all stored little-endian in `dtype`.
    Same bytes as TensorFlow's serializer (map entry -> Feature -> BytesList -> bytes)."""
    np_dtype = "<u2" if dtype == "uint16" else "<i4"
    if not isinstance(row, Mapping):
        raw = np.asarray(row).astype(np_dtype).tobytes()
        return _example_prefix("input_ids", len(raw)) + raw
    entries = b"".join(
        _field(1, _field(1, key.encode()) + _field(2, _field(1, _field(1, np.asarray(v).astype(np_dtype).tobytes()))))
        for key, v in sorted(row.items()))
    return _field(1, entries)


# ---- TFRecord framing without TensorFlow: uint64 length, masked crc32c(length), data, masked crc32c(data) ------

def _crc32c_table() -> np.ndarray:
    table = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table[i] = c
    return table


_CRC_TABLE = _crc32c_table()


def masked_crc32c(data: np.ndarray) -> np.ndarray:
    """TFRecord's masked CRC-32C of each row of `data` (uint8 [n, length]), computed for all rows at once:
    one vectorised table step per byte position instead of a Python loop per byte."""
    columns = np.ascontiguousarray(data.T)
    crc = np.full(data.shape[0], 0xFFFFFFFF, np.uint32)
    for column in columns:
        crc = _CRC_TABLE[(crc ^ column) & 0xFF] ^ (crc >> np.uint32(8))
    crc ^= np.uint32(0xFFFFFFFF)
    return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)


def frame_records(records: list[bytes]) -> bytes:
    """TFRecord file bytes for `records` (runs of equal-length records are checksummed together)."""
    out = []
    for length, group in itertools.groupby(records, len):
        group = list(group)
        data = np.frombuffer(b"".join(group), np.uint8).reshape(len(group), length)
        header = np.frombuffer(np.uint64(length).astype("<u8").tobytes(), np.uint8)
        frames = np.empty((len(group), 16 + length), np.uint8)
        frames[:, :8] = header
        frames[:, 8:12] = masked_crc32c(header[None]).astype("<u4").view(np.uint8)
        frames[:, 12:12 + length] = data
        frames[:, 12 + length:] = masked_crc32c(data).astype("<u4").view(np.uint8).reshape(-1, 4)
        out.append(frames.tobytes())
    return b"".join(out)


def _input_ids(row) -> np.ndarray:
    return np.asarray(row["input_ids"] if isinstance(row, Mapping) else row)


# ---- parallel encoding, order preserved --------------------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER  # pylint: disable=global-statement
    _WORKER_TOKENIZER = Tokenizer.load(tokenizer_dir)


def _encode(tokenizer, docs: list[str]):
    """(ids of all documents concatenated, int32; token count per document; utf-8 bytes per document)."""
    ids = tokenizer.encode_batch(docs)
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
    return flat, lengths, [len(d.encode("utf-8")) for d in docs]


def _encode_in_worker(docs: list[str]):
    return _encode(_WORKER_TOKENIZER, docs)


def _ordered_map(tokenizer, tokenizer_dir: str, batches: Iterable[list[str]], workers: int) -> Iterator:
    """`_encode` over `batches`, results in input order; at most 2 batches per worker in flight, so memory does
    not grow with the corpus (Pool.imap would read the whole input ahead)."""
    if workers == 1:
        for batch in batches:
            yield _encode(tokenizer, batch)
        return
    # spawn, not fork: the parent may already run TensorFlow / tokenizers threads. One thread per worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir,)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Docs:
    """Encoded documents one by one as (np.int32 ids, utf-8 bytes of the text), with a look-ahead; the bar
    advances by each batch's bytes."""

    def __init__(self, results: Iterator, bar):
        self._results, self._bar = results, bar
        self._queue: collections.deque = collections.deque()
        self.bytes = 0  # text bytes of all documents received so far
        self._docs, self._start = 0, time.time()

    def has_next(self) -> bool:
        while not self._queue:
            try:
                flat, lengths, nbytes = next(self._results)
            except StopIteration:
                return False
            self._queue.extend(zip(np.split(flat, np.cumsum(lengths)[:-1]), nbytes) if len(lengths) else [])
            self.bytes += sum(nbytes)
            self._docs += len(nbytes)
            self._bar.set_postfix_str(f"{self._docs / max(time.time() - self._start, 1e-9):.0f} docs/s",
                                      refresh=False)
            self._bar.update(sum(nbytes))  # the bar itself shows MB/s and the ETA
        return True

    def pop(self) -> tuple[np.ndarray, int]:
        return self._queue.popleft()


# ---- one split -----------------------------------------------------------------------------------------------

def _write_split(split: str, docs: _Docs, out_dir: str, state: dict, save, *, shard_rows: int, seq_len: int,
                 tokenizer, dtype: str) -> None:
    """Write parts of `shard_rows` rows until `docs` runs out, recording each finished part in `state`."""
    parts = state["parts"]
    while docs.has_next():
        final = os.path.join(out_dir, part_name(split, len(parts)))
        count = {"rows": 0, "tokens": 0, "consumed": 0, "documents": 0, "text_bytes": 0}

        def part_docs():
            # Stop at a document boundary once the part is full: packing restarts with the next part, so a part
            # depends only on its own documents and a resume can start exactly there.
            while count["rows"] < shard_rows and docs.has_next():
                ids, nbytes = docs.pop()
                count["consumed"] += 1
                count["text_bytes"] += nbytes
                count["documents"] += bool(ids.size)
                yield ids

        with open(final + ".tmp", "wb") as f:
            records = []
            for row in pack_documents(part_docs(), seq_len, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id):
                records.append(serialize_row(row, dtype))
                count["rows"] += 1
                count["tokens"] += int(np.count_nonzero(_input_ids(row) != tokenizer.pad_id))
                if len(records) == _WRITE_BATCH:
                    f.write(frame_records(records))
                    records = []
            f.write(frame_records(records))
        os.replace(final + ".tmp", final)
        parts.append({"file": os.path.basename(final), "rows": count["rows"], "tokens": count["tokens"],
                      "documents": count["documents"], "consumed": count["consumed"],
                      "text_bytes": count["text_bytes"], "sha256": _sha256(final)})
        save()
    state["complete"] = True
    save()


def _finalize_split(split: str, state: dict, out_dir: str, num_shards: int | None, pad_id: int,
                    dtype: str) -> list[dict]:
    """Turn the split's parts into its final shards (renamed, or re-cut into exactly `num_shards` files)."""
    parts = [p for p in state["parts"] if p["rows"] > 0]
    if num_shards is None:
        if not parts:
            return _recut(split, [], out_dir, 1, pad_id, dtype)
        shards = []
        for i, part in enumerate(parts):
            name = shard_name(split, i, len(parts))
            src, dst = os.path.join(out_dir, part["file"]), os.path.join(out_dir, name)
            if os.path.exists(src):
                os.replace(src, dst)
            elif not (os.path.exists(dst) and _sha256(dst) == part["sha256"]):  # renamed by a killed run?
                raise DataError(f"{src}: part listed in {PROGRESS} is missing; pass --overwrite to start over")
            # "documents": the shard packs exactly its own documents (the next ones in the split's order).
            shards.append({"file": name, "rows": part["rows"], "tokens": part["tokens"],
                           "documents": part["documents"], "sha256": part["sha256"]})
        return shards
    return _recut(split, parts, out_dir, num_shards, pad_id, dtype)


def _records(path: str) -> Iterator[bytes]:
    """Raw framed records (length, crc, payload, crc) of a TFRecord file, copied without re-encoding."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if not header:
                return
            (length,) = np.frombuffer(header[:8], "<u8")
            yield header + f.read(int(length) + 4)


def _recut(split: str, parts: list[dict], out_dir: str, num_shards: int, pad_id: int, dtype: str) -> list[dict]:
    """Copy the parts' records into `num_shards` contiguous shards (shard i: rows [i*n/k, (i+1)*n/k))."""
    from data_pipeline.validate import parse_example  # pylint: disable=import-outside-toplevel

    np_dtype = "<u2" if dtype == "uint16" else "<i4"
    total = sum(p["rows"] for p in parts)
    records = itertools.chain.from_iterable(_records(os.path.join(out_dir, p["file"])) for p in parts)
    shards = []
    for i in range(num_shards):
        n = (i + 1) * total // num_shards - i * total // num_shards
        name = shard_name(split, i, num_shards)
        path = os.path.join(out_dir, name)
        tokens = 0
        with open(path + ".tmp", "wb") as f:
            for record in itertools.islice(records, n):
                f.write(record)
                ids = np.frombuffer(parse_example(record[12:-4])["input_ids"], np_dtype)
                tokens += int(np.count_nonzero(ids != pad_id))
        os.replace(path + ".tmp", path)
        shards.append({"file": name, "rows": n, "tokens": tokens, "sha256": _sha256(path)})
    return shards


def _write_shards(rows: np.ndarray, split: str, out_dir: str, num_shards: int, dtype: str,
                  pad_id: int) -> list[dict]:
    """Write an in-memory array of rows [n, seq_len] as `num_shards` contiguous shards; their manifest entries.
    (For tools and tests that build shards directly; the pipeline itself streams parts.)"""
    shards = []
    for i in range(num_shards):
        lo, hi = i * len(rows) // num_shards, (i + 1) * len(rows) // num_shards
        name = shard_name(split, i, num_shards)
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "wb") as f:
            f.write(frame_records([serialize_row(r, dtype) for r in rows[lo:hi]]))
        os.replace(path + ".tmp", path)
        shards.append({"file": name, "rows": int(hi - lo), "tokens": int(np.count_nonzero(rows[lo:hi] != pad_id)),
                       "sha256": _sha256(path)})
    return shards


# ---- the whole run -------------------------------------------------------------------------------------------

def _load_given_tokenizer(vocab: str, kind: str | None, lowercase: bool | None):
    # Only an explicit cased request overrides the vocab's own config: the default (uncased) must not silently
    # lowercase input for a cased vocabulary.
    tok = Tokenizer.load(vocab, lowercase=False if lowercase is False else None)
    if kind is not None and (kind == "wordpiece") != (tok.kind == "wordpiece"):
        raise DataError(f"--tokenizer {kind} does not match {vocab} (a {tok.kind} tokenizer)")
    return tok


def pretokenize(source: str, out_dir: str, *, vocab_size: int = 8000, seq_len: int = 128,
                vocab: str | None = None, lowercase: bool | None = True, validation_fraction: float = 0.02,
                num_shards: int | None = None, shard_rows: int | None = None, text_field: str = "text",
                max_documents: int | None = None, cache_dir: str | None = None, overwrite: bool = False,
                txt_mode: str = "block", tokenizer: str | None = None, tfds_split: str = "train",
                tfds_data_dir: str | None = None, workers: int | None = None,
                tokenizer_train_documents: int | None = None, log=None) -> dict:
    """Tokenize, pack and shard `source` into `out_dir`; returns the manifest (also in `out_dir/manifest.json`).

    Args:
      source: "docstrings", "docstrings:stdlib", "tfds:NAME", or a text/JSONL file, folder or glob (`sources`).
      vocab_size: size of the vocabulary to train (ignored when `vocab` is given).
      seq_len: row length in tokens, including [CLS] and [SEP]; 8..65536.
      vocab: an existing vocab.txt, tokenizer.json, SentencePiece .model, or a folder holding one; skips training.
      lowercase: uncased (True) or cased (False) tokenizer. With `vocab`, only False overrides the
        vocab's own configuration (which otherwise decides).
      validation_fraction: share of documents (by text hash) put in the validation split; in [0, 1).
      num_shards: exactly this many shards per split (re-cut from the parts at the end).
      shard_rows: rows per part, and so per shard when `num_shards` is None (default 50000); a part may hold
        one row more than its documents fill exactly, as it ends at a document boundary.
      tokenizer: "wordpiece" (default), "sentencepiece-unigram" or "sentencepiece-bpe".
      tfds_split, tfds_data_dir: the TFDS split and data folder of a "tfds:NAME" source (feature: `text_field`).
      workers: encoding processes (default: all cores); the output does not depend on it.
      tokenizer_train_documents: train the tokenizer on only the first N train documents (default: all); a
        vocabulary needs far less text than a large corpus holds.
      overwrite: replace an existing dataset or unfinished run in `out_dir` made with other arguments.
    """
    log = log or (lambda msg: None)
    if not 8 <= seq_len <= 65536:
        raise DataError(f"seq_len must be in [8, 65536], got {seq_len}")
    if vocab is None and vocab_size < 100:
        raise DataError(f"vocab_size must be >= 100, got {vocab_size}")
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if num_shards is not None and num_shards < 1:
        raise DataError(f"num_shards must be >= 1, got {num_shards}")
    if shard_rows is not None and shard_rows < 1:
        raise DataError(f"shard_rows must be >= 1, got {shard_rows}")
    if tokenizer is not None and tokenizer not in TOKENIZERS:
        raise DataError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if tokenizer_train_documents is not None and tokenizer_train_documents < 1:
        raise DataError(f"tokenizer_train_documents must be >= 1, got {tokenizer_train_documents}")
    shard_rows = shard_rows or MAX_ROWS_PER_SHARD

    given = _load_given_tokenizer(vocab, tokenizer, lowercase) if vocab else None
    args = {"source": source, "text_field": text_field, "txt_mode": txt_mode, "max_documents": max_documents,
            "tfds_split": tfds_split if source.startswith("tfds:") else None,
            "tfds_data_dir": tfds_data_dir if source.startswith("tfds:") else None,
            "seq_len": seq_len, "validation_fraction": validation_fraction, "num_shards": num_shards,
            "shard_rows": shard_rows,
            "tokenizer": given.kind if given else (tokenizer or "wordpiece"),
            "vocab_hash": given.vocab_hash if given else None,
            "vocab_size": None if given else vocab_size,
            "tokenizer_train_documents": None if given else tokenizer_train_documents,
            "lowercase": given.lowercase if given else lowercase is not False}

    total_bytes = source_bytes(source)  # also: a source that matches no file fails here, before any change
    manifest_path, progress_path = os.path.join(out_dir, MANIFEST), os.path.join(out_dir, PROGRESS)
    state = None
    if os.path.isdir(out_dir) and overwrite:
        _clear_tool_files(out_dir)
    elif os.path.exists(manifest_path):
        manifest = _read_json(manifest_path)
        if isinstance(manifest, dict) and manifest.get("args") == args:
            _remove_leftovers(out_dir, manifest)
            log(f"{out_dir} is already complete with these arguments: nothing to do")
            return manifest
        raise DataError(f"{out_dir} already holds a pretokenized dataset ({MANIFEST}) made with other "
                        "arguments; pass --overwrite to replace it")
    elif os.path.exists(progress_path):
        state = _read_json(progress_path)
        if not isinstance(state, dict) or state.get("args") != args:
            raise DataError(f"{out_dir} holds an unfinished run ({PROGRESS}) with other arguments; "
                            "run again with the same arguments to resume, or pass --overwrite to start over")
        log("resuming: " + ", ".join(f"{s} {len(v['parts'])} parts" for s, v in state["splits"].items()))
    elif os.path.isdir(out_dir):
        _clear_tool_files(out_dir)  # a run killed before its first progress.json: nothing finished to keep
    os.makedirs(out_dir, exist_ok=True)

    def read() -> Iterable[str]:
        return iter_documents(source, text_field=text_field, cache_dir=cache_dir, max_documents=max_documents,
                              txt_mode=txt_mode, tfds_split=tfds_split, tfds_data_dir=tfds_data_dir)

    # The source is read once per split (and once more to train a tokenizer). The docstring corpus is built in
    # memory anyway (tens of MB at most), so it is built once instead.
    corpus = list(read()) if source.startswith("docstrings") else None

    def documents(split: str) -> Iterator[str]:
        docs = corpus if corpus is not None else read()
        return (d for d in docs if d.strip() and split_of(d, validation_fraction) == split)

    start = time.time()
    tok_dir = os.path.join(out_dir, TOKENIZER_DIR)
    if state is not None:
        tok = Tokenizer.load(tok_dir)
        if tok.vocab_hash != state["vocab_hash"]:
            raise DataError(f"{tok_dir}: vocab hash differs from {PROGRESS}; pass --overwrite to start over")
    elif given is not None:
        tok = given
        tok.save(tok_dir)
    else:
        seen = [0]

        def counted(docs):
            with progress(desc="tokenizer training: reading", unit="doc") as bar:
                for d in docs:
                    seen[0] += 1
                    bar.update(1)
                    yield d

        train_docs = itertools.islice(documents("train"), tokenizer_train_documents)
        train_tokenizer(args["tokenizer"], counted(train_docs), vocab_size, tok_dir, lowercase=lowercase is not False)
        if not seen[0]:
            raise DataError(f"source {source!r} gave no non-empty training documents")
        tok = Tokenizer.load(tok_dir)
        log(f"trained {tok.kind} vocab of {tok.vocab_size} in {time.time() - start:.1f}s")
    if state is None:
        state = {"args": args, "vocab_hash": tok.vocab_hash,
                 "splits": {s: {"parts": [], "complete": False} for s in SPLITS}}
        _write_json(progress_path, state)

    dtype = "uint16" if tok.vocab_size <= 65536 else "int32"
    for split in SPLITS:
        split_state = state["splits"][split]
        if split_state["complete"]:
            continue
        _remove_unrecorded_parts(out_dir, split, split_state)
        t0 = time.time()
        skip = sum(p["consumed"] for p in split_state["parts"])
        batches = _batched(itertools.islice(documents(split), skip, None), _BATCH_DOCS)
        with progress(desc=f"{split}", unit="B", unit_scale=True,
                      total=total_bytes if split == "train" and not skip else None) as bar:
            docs = _Docs(_ordered_map(tok, tok_dir, batches, workers), bar)
            _write_split(split, docs, out_dir, split_state, lambda: _write_json(progress_path, state),
                         shard_rows=shard_rows, seq_len=seq_len, tokenizer=tok, dtype=dtype)
        seconds = max(time.time() - t0, 1e-9)
        n_docs = sum(p["consumed"] for p in split_state["parts"]) - skip
        log(f"{split}: {n_docs} documents, {docs.bytes / 1e6:.1f} MB in {seconds:.1f}s "
            f"({n_docs / seconds:.0f} docs/s, {docs.bytes / 1e6 / seconds:.2f} MB/s, {workers} workers)")

    if not sum(p["documents"] for p in state["splits"]["train"]["parts"]):
        raise DataError(f"source {source!r} gave no non-empty training documents")
    splits = {}
    for split in SPLITS:
        parts = state["splits"][split]["parts"]
        shards = _finalize_split(split, state["splits"][split], out_dir, num_shards, tok.pad_id, dtype)
        splits[split] = {"rows": sum(s["rows"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                         "documents": sum(p["documents"] for p in parts), "shards": shards}
    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "vocab_size": tok.vocab_size,
        "vocab_hash": tok.vocab_hash,
        "dtype": dtype,
        "lowercase": tok.lowercase,
        "special_ids": {"pad": tok.pad_id, "unk": tok.unk_id, "cls": tok.cls_id, "sep": tok.sep_id,
                        "mask": tok.mask_id},
        "special_token_ids": list(tok.special_ids),
        "tokenizer": {"type": tok.kind, "dir": TOKENIZER_DIR, "files": tok.files,
                      "sha256": {f: _sha256(os.path.join(tok_dir, f)) for f in tok.files}},
        "packing": "full_sentences",
        "source": source,
        "validation_fraction": validation_fraction,
        "text_bytes": sum(p["text_bytes"] for s in SPLITS for p in state["splits"][s]["parts"]),
        "splits": splits,
        "args": args,
        "created_by": "data_pipeline.pretokenize",
    }
    _write_json(manifest_path, manifest)
    _remove_leftovers(out_dir, manifest)
    log(f"wrote {out_dir} in {time.time() - start:.1f}s")
    return manifest


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _remove_unrecorded_parts(out_dir: str, split: str, split_state: dict) -> None:
    """Delete part files (and temporaries) of `split` that progress.json does not list: a killed run's half work."""
    recorded = {p["file"] for p in split_state["parts"]}
    for name in os.listdir(out_dir):
        if name.startswith(f"{split}-part-") and _SHARD_RE.match(name) and name not in recorded:
            os.remove(os.path.join(out_dir, name))


def _remove_leftovers(out_dir: str, manifest: dict) -> None:
    """After the manifest is written: parts, temporaries and progress.json are no longer needed."""
    keep = {s["file"] for info in manifest["splits"].values() for s in info["shards"]}
    for name in os.listdir(out_dir):
        if (_SHARD_RE.match(name) and name not in keep) or name == PROGRESS:
            os.remove(os.path.join(out_dir, name))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.pretokenize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True,
                   help='"docstrings", "docstrings:stdlib", "tfds:NAME" (e.g. tfds:c4/en), or a text/JSONL(.gz) '
                        "file, folder or glob")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default=None,
                   help="tokenizer to train (default wordpiece); with --vocab, taken from the file")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary to train (default 8000)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row, [CLS] and [SEP] included")
    p.add_argument("--vocab", default=None,
                   help="existing vocab.txt, tokenizer.json or SentencePiece .model (or a folder) instead of training")
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: uncased)")
    p.add_argument("--validation-fraction", type=float, default=0.02)
    p.add_argument("--shard-rows", type=int, default=None,
                   help=f"rows per shard (default {MAX_ROWS_PER_SHARD}); also the unit of resumption")
    p.add_argument("--num-shards", type=int, default=None, help="exactly this many shards per split")
    p.add_argument("--text-field", default="text", help="JSON field, or TFDS feature, holding the text")
    p.add_argument("--txt-mode", choices=("block", "line"), default="block",
                   help="text files: a document per blank-line-separated block, or per line")
    p.add_argument("--tfds-split", default="train", help="TFDS split to read (tfds: sources)")
    p.add_argument("--tfds-data-dir", default=None, help="folder of prepared TFDS data (nothing is downloaded)")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--tokenizer-train-documents", type=int, default=None,
                   help="train the tokenizer on the first N train documents only (default: all)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    p.add_argument("--cache-dir", default=None, help="cache for the docstring corpus")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset or unfinished run in --out made with other arguments")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.vocab and args.vocab_size is not None:
            size = Tokenizer.load(args.vocab).vocab_size
            if size != args.vocab_size:
                raise DataError(f"--vocab-size {args.vocab_size} does not match {args.vocab} ({size} tokens)")
        manifest = pretokenize(
            args.source, args.out, vocab_size=args.vocab_size or 8000, seq_len=args.seq_len,
            vocab=args.vocab, lowercase=False if args.cased else (None if args.vocab else True),
            validation_fraction=args.validation_fraction, num_shards=args.num_shards, shard_rows=args.shard_rows,
            text_field=args.text_field, max_documents=args.max_documents, cache_dir=args.cache_dir,
            overwrite=args.overwrite, txt_mode=args.txt_mode, tokenizer=args.tokenizer, tfds_split=args.tfds_split,
            tfds_data_dir=args.tfds_data_dir, workers=args.workers,
            tokenizer_train_documents=args.tokenizer_train_documents, log=log)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['rows']} rows, {info['tokens']} tokens, {len(info['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
