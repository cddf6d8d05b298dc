"""Check a pretokenized dataset against its manifest: `python -m data_pipeline.validate DIR`.

Recomputes every shard's sha256 and counts its records (with a minimal TFRecord framing reader, so no
TensorFlow is needed); prints `OK` or one line per problem and exits 1 when there are problems.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys

from data_pipeline.dataset import load_manifest
from data_pipeline.errors import DataError


def _count_records(path: str) -> int:
    """Number of records in a TFRecord file; DataError if the framing is truncated.

    TFRecord framing: uint64 length, uint32 crc of the length, payload, uint32 crc of the payload.
    CRCs are not checked here: the sha256 comparison already catches corrupted bytes.
    """
    n = 0
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if not header:
                return n
            if len(header) < 12:
                raise DataError(f"{path}: truncated record header after {n} records")
            (length,) = struct.unpack("<Q", header[:8])
            f.seek(length + 4, os.SEEK_CUR)
            if f.tell() > os.fstat(f.fileno()).st_size:
                raise DataError(f"{path}: truncated record {n}")
            n += 1


def check(data_dir: str) -> list[str]:
    """Problems found in `data_dir` (empty list when the dataset matches its manifest)."""
    try:
        manifest = load_manifest(data_dir)
    except DataError as e:
        return [str(e)]
    problems = []
    for split, info in manifest["splits"].items():
        shards = info.get("shards", [])
        for key in ("rows", "tokens"):
            if key in info and info[key] != sum(s.get(key, 0) for s in shards):
                problems.append(f"{split}: manifest {key} {info[key]} != sum over its shards")
        for shard in shards:
            path = os.path.join(data_dir, shard["file"])
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != shard.get("sha256"):
                problems.append(f"{path}: sha256 {h.hexdigest()} != manifest {shard.get('sha256')}")
            try:
                rows = _count_records(path)
            except DataError as e:
                problems.append(str(e))
                continue
            if rows != shard.get("rows"):
                problems.append(f"{path}: {rows} records != manifest rows {shard.get('rows')}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="a directory written by data_pipeline.pretokenize")
    args = parser.parse_args(argv)
    problems = check(args.data_dir)
    for p in problems:
        print(p)
    if not problems:
        print("OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
