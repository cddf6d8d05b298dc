"""Check a pretokenized dataset against its manifest: `python -m data_pipeline.validate DIR`.

For every shard: it exists, its sha256 and record count match the manifest, the TFRecord framing is whole,
and every record is a `tf.train.Example` whose `input_ids` hold `seq_len` ids of the manifest's dtype
(uint16 or int32), each below `vocab_size`. The tokenizer files are checked against their recorded sha256.
No TensorFlow is needed (a minimal TFRecord and protobuf reader). Prints `OK`, or one line per problem
naming the file, and exits 1 when there are problems. DIR may be an object-store URL (gs://...).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from data_pipeline import manifest as manifest_lib
from data_pipeline import paths
from data_pipeline import records
from data_pipeline.errors import DataError
from data_pipeline.manifest import Manifest, Shard


def _check_records(path: str, manifest: Manifest) -> tuple[int, str | None]:
    """(records read, the first problem or None): every record must be an Example whose `input_ids` hold
    `seq_len` ids of the manifest's dtype, each in [0, vocab_size)."""
    seq_len, vocab_size, dtype = manifest.seq_len, manifest.vocab_size, manifest.dtype
    width = 2 if dtype == "uint16" else 4
    rows = 0
    try:
        for record in records.read_records(path):
            try:
                raw = records.parse_example(record).get("input_ids")
            except (ValueError, UnicodeDecodeError) as e:
                return rows, f"{path}: record {rows} is not a valid tf.train.Example ({e})"
            if raw is None or len(raw) != seq_len * width:
                got = "no input_ids" if raw is None else f"{len(raw)} bytes"
                return rows, (f"{path}: record {rows} has {got}, expected {seq_len} {dtype} ids "
                              f"({seq_len * width} bytes)")
            ids = np.frombuffer(raw, records.numpy_dtype(dtype))
            if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
                return rows, (f"{path}: record {rows} has token id {int(ids.max())} or {int(ids.min())} "
                              f"outside [0, {vocab_size})")
            rows += 1
    except DataError as e:
        return rows, str(e)
    return rows, None


def _check_shard(path: str, shard: Shard, manifest: Manifest) -> list[str]:
    if not paths.isfile(path):
        return [f"{path}: missing (listed in the manifest)"]
    problems = []
    digest = records.file_sha256(path)
    if digest != shard.sha256:
        problems.append(f"{path}: sha256 {digest} != manifest {shard.sha256}")
    rows, problem = _check_records(path, manifest)
    if problem:  # the record count of a shard with a bad record means nothing
        return problems + [problem]
    if rows != shard.rows:
        problems.append(f"{path}: {rows} records != manifest rows {shard.rows}")
    return problems


def _check_tokenizer(data_dir: str, manifest: Manifest) -> list[str]:
    problems = []
    tok = manifest.tokenizer
    for name, expected in (tok.sha256 if tok else {}).items():
        file = paths.join(data_dir, tok.dir, name)
        if not paths.isfile(file):
            problems.append(f"{file}: missing (listed in the manifest)")
        elif (got := records.file_sha256(file)) != expected:
            problems.append(f"{file}: sha256 {got} != manifest {expected}")
    return problems


def check(data_dir: str) -> list[str]:
    """Problems found in `data_dir` (empty list when the dataset matches its manifest)."""
    path = manifest_lib.path(data_dir)
    if not paths.isfile(path):
        return [f"{path}: missing (not a pretokenized dataset, or unfinished)"]
    try:
        manifest = manifest_lib.read(path)
    except DataError as e:  # not JSON, not a manifest, a key missing or malformed: nothing else can be checked
        return [str(e)]
    if manifest.dtype == "uint16" and manifest.vocab_size > 65536:
        return [f"{path}: dtype uint16 cannot hold a vocabulary of {manifest.vocab_size}"]
    problems = _check_tokenizer(data_dir, manifest)
    for name, split in manifest.splits.items():
        for key in ("rows", "tokens"):
            if getattr(split, key) != sum(getattr(s, key) for s in split.shards):
                problems.append(f"{path}: split {name} {key} {getattr(split, key)} != the sum over its shards")
        for shard in split.shards:
            problems += _check_shard(paths.join(data_dir, shard.file), shard, manifest)
    return problems


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="a directory written by data_pipeline.pretokenize")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    problems = check(args.data_dir)
    for p in problems:
        print(p)
    if not problems:
        print("OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
