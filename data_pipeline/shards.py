"""The files of a dataset folder while pretokenize builds it: parts, final shards, progress.json, clean-up.

    DIR/{split}-part-{i:05d}.tfrecord     a finished part: `shard_rows` rows (ends at a document boundary)
    DIR/*.tfrecord.tmp                     a part or shard being written (renamed when complete)
    DIR/progress.json                      the run's arguments and every finished part (what a resume skips)
    DIR/{split}-{i:05d}-of-{n:05d}.tfrecord    the final shards, named once a split is complete

A part restarts packing at a document boundary, so it depends only on its own documents: a killed run
resumes after the last recorded part and gives bitwise the same shards. At the end the parts are renamed
to shards (one shard per part), or re-cut into exactly `num_shards` contiguous shards.

On object storage (DIR a gs:// URL, through `data_pipeline.paths`) a part or shard is spooled locally and
uploaded as one object when complete, so no `.tmp` object exists and none is ever half-written; naming a
part as a shard is a server-side copy. The manifest, written last, is what makes the dataset visible.
"""

from __future__ import annotations

import itertools
import re
from typing import Callable

import numpy as np

from data_pipeline import manifest as manifest_lib
from data_pipeline import paths
from data_pipeline import records
from data_pipeline.errors import DataError
from data_pipeline.manifest import Manifest, Shard
from data_pipeline.packing import pack_documents

PROGRESS = "progress.json"
TOKENIZER_DIR = "tokenizer"
_SHARD_RE = re.compile(r"^(train|validation)-(\d{5}-of-\d{5}|part-\d{5})\.tfrecord(\.tmp)?$")
_WRITE_BATCH = 1024  # rows checksummed and written together


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def part_name(split: str, index: int) -> str:
    return f"{split}-part-{index:05d}.tfrecord"


def _non_pad_tokens(row: np.ndarray, pad_id: int) -> int:
    return int(np.count_nonzero(np.asarray(row) != pad_id))


# ---- writing parts --------------------------------------------------------------------------------------------

def _write_part(path: str, docs, shard_rows: int, seq_len: int, tokenizer, dtype: str) -> dict:
    """Packs documents from `docs` (an encoding.EncodedDocs) into `path` until it holds `shard_rows` rows or the
    documents run out; the part's progress entry (without its file name and checksum)."""
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

    with paths.atomic_write(path) as f:  # visible under its name only once complete (object storage too)
        batch = []
        for row in pack_documents(part_docs(), seq_len, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id):
            batch.append(records.serialize_row(row, dtype))
            count["rows"] += 1
            count["tokens"] += _non_pad_tokens(row, tokenizer.pad_id)
            if len(batch) == _WRITE_BATCH:
                f.write(records.frame_records(batch))
                batch = []
        f.write(records.frame_records(batch))
    return count


def write_split(split: str, docs, out_dir: str, state: dict, save: Callable[[], None], *, shard_rows: int,
                seq_len: int, tokenizer, dtype: str) -> None:
    """Write parts of `shard_rows` rows until `docs` runs out, recording each finished part in `state` (the
    split's progress entry) and calling `save` after each, so a killed run can resume after it."""
    parts = state["parts"]
    while docs.has_next():
        path = paths.join(out_dir, part_name(split, len(parts)))
        count = _write_part(path, docs, shard_rows, seq_len, tokenizer, dtype)
        parts.append({"file": paths.basename(path), "rows": count["rows"], "tokens": count["tokens"],
                      "documents": count["documents"], "consumed": count["consumed"],
                      "text_bytes": count["text_bytes"], "sha256": records.file_sha256(path)})
        save()
    state["complete"] = True
    save()


# ---- final shards ---------------------------------------------------------------------------------------------

def finalize_split(split: str, state: dict, out_dir: str, num_shards: int | None, pad_id: int,
                   dtype: str) -> list[Shard]:
    """Turn the split's parts into its final shards (renamed, or re-cut into exactly `num_shards` files)."""
    parts = [p for p in state["parts"] if p["rows"] > 0]
    if num_shards is not None:
        return _recut(split, parts, out_dir, num_shards, pad_id, dtype)
    if not parts:
        return _recut(split, [], out_dir, 1, pad_id, dtype)
    shards = []
    for i, part in enumerate(parts):
        name = shard_name(split, i, len(parts))
        src, dst = paths.join(out_dir, part["file"]), paths.join(out_dir, name)
        if paths.exists(src):
            paths.replace(src, dst)
        elif not (paths.exists(dst) and records.file_sha256(dst) == part["sha256"]):  # renamed by a killed run?
            raise DataError(f"{src}: part listed in {PROGRESS} is missing; pass --overwrite to start over")
        # "documents": the shard packs exactly its own documents (the next ones in the split's order).
        shards.append(Shard(file=name, rows=part["rows"], tokens=part["tokens"], documents=part["documents"],
                            sha256=part["sha256"]))
    return shards


def _recut(split: str, parts: list[dict], out_dir: str, num_shards: int, pad_id: int, dtype: str) -> list[Shard]:
    """Copy the parts' records into `num_shards` contiguous shards (shard i: rows [i*n/k, (i+1)*n/k))."""
    np_dtype = records.numpy_dtype(dtype)
    total = sum(p["rows"] for p in parts)
    framed = itertools.chain.from_iterable(records.framed_records(paths.join(out_dir, p["file"])) for p in parts)
    shards = []
    for i in range(num_shards):
        n = (i + 1) * total // num_shards - i * total // num_shards
        name = shard_name(split, i, num_shards)
        path = paths.join(out_dir, name)
        tokens = 0
        with paths.atomic_write(path) as f:
            for record in itertools.islice(framed, n):
                f.write(record)
                payload = record[records.HEADER_BYTES:-records.FOOTER_BYTES]
                ids = np.frombuffer(records.parse_example(payload)["input_ids"], np_dtype)
                tokens += _non_pad_tokens(ids, pad_id)
        shards.append(Shard(file=name, rows=n, tokens=tokens, sha256=records.file_sha256(path)))
    return shards


# ---- clean-up -------------------------------------------------------------------------------------------------

def clear_tool_files(out_dir: str) -> None:
    """Remove only the files pretokenize writes (shards, parts, progress, tokenizer): never anything else."""
    # The manifest first: a crash below never leaves one next to missing shards.
    for name in (manifest_lib.FILENAME, PROGRESS):
        if paths.exists(paths.join(out_dir, name)):
            paths.remove(paths.join(out_dir, name))
    for name in paths.listdir(out_dir):
        path = paths.join(out_dir, name)
        if _SHARD_RE.match(name) or name.endswith(".json.tmp"):
            paths.remove(path)
        elif name == TOKENIZER_DIR and paths.isdir(path):
            paths.rmtree(path)


def remove_unrecorded_parts(out_dir: str, split: str, state: dict) -> None:
    """Delete part files (and temporaries) of `split` that its progress entry does not list: a killed run's
    half work."""
    recorded = {p["file"] for p in state["parts"]}
    for name in paths.listdir(out_dir):
        if name.startswith(f"{split}-part-") and _SHARD_RE.match(name) and name not in recorded:
            paths.remove(paths.join(out_dir, name))


def remove_leftovers(out_dir: str, manifest: Manifest) -> None:
    """After the manifest is written: parts, temporaries and progress.json are no longer needed."""
    keep = {s.file for split in manifest.splits.values() for s in split.shards}
    for name in paths.listdir(out_dir):
        if (_SHARD_RE.match(name) and name not in keep) or name == PROGRESS:
            paths.remove(paths.join(out_dir, name))
