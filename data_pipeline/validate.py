"""Check a pretokenized dataset against its manifest: `python -m data_pipeline.validate DIR`.

For every shard: it exists, its sha256 and record count match the manifest, the TFRecord framing is whole,
and every record is a `tf.train.Example` whose `input_ids` hold `seq_len` ids of the manifest's dtype
(uint16 or int32), each below `vocab_size`. The tokenizer files are checked against their recorded sha256.
No TensorFlow is needed (a minimal TFRecord and protobuf reader). Prints `OK`, or one line per problem
naming the file, and exits 1 when there are problems.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
from typing import Iterator

import numpy as np

from data_pipeline.errors import DataError

_REQUIRED_KEYS = ("seq_len", "vocab_size", "dtype", "special_ids", "splits")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """(field number, payload) of the length-delimited fields of a protobuf message; other wire types skipped."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            yield key >> 3, buf[pos:pos + length]
            pos += length
        elif wire == 0:
            _, pos = _varint(buf, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def parse_example(record: bytes) -> dict[str, bytes]:
    """The bytes features of a serialized `tf.train.Example` (first value of each BytesList); ValueError if
    malformed. Example{1: Features{1: map<string, Feature>}}, Feature{1: BytesList{1: bytes}}."""
    out = {}
    for number, features in _fields(record):
        if number != 1:
            continue
        for number2, entry in _fields(features):
            if number2 != 1:
                continue
            key, value = None, b""
            for n, payload in _fields(entry):
                if n == 1:
                    key = payload.decode("utf-8")
                elif n == 2:
                    value = payload
            for n, bytes_list in _fields(value):
                if n == 1:  # BytesList
                    out[key] = next((v for m, v in _fields(bytes_list) if m == 1), b"")
    return out


def read_records(path: str) -> Iterator[bytes]:
    """Payloads of a TFRecord file (uint64 length, uint32 crc, payload, uint32 crc); DataError when truncated.

    CRCs are not checked: the sha256 comparison against the manifest already catches corrupted bytes."""
    n = 0
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise DataError(f"{path}: truncated record header after {n} records")
            (length,) = struct.unpack("<Q", header[:8])
            if f.tell() + length + 4 > size:
                raise DataError(f"{path}: truncated record {n}")
            payload = f.read(length)
            f.seek(4, os.SEEK_CUR)
            yield payload
            n += 1


def read_shard_rows(path: str, dtype: str) -> Iterator[np.ndarray]:
    """The `input_ids` rows of a shard as int32 arrays (no TensorFlow)."""
    np_dtype = "<u2" if dtype == "uint16" else "<i4"
    for record in read_records(path):
        yield np.frombuffer(parse_example(record)["input_ids"], np_dtype).astype(np.int32)


def _check_shard(path: str, shard: dict, seq_len: int, vocab_size: int, dtype: str) -> list[str]:
    if not os.path.isfile(path):
        return [f"{path}: missing (listed in the manifest)"]
    problems = []
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != shard.get("sha256"):
        problems.append(f"{path}: sha256 {digest.hexdigest()} != manifest {shard.get('sha256')}")
    width = 2 if dtype == "uint16" else 4
    rows = 0
    try:
        for record in read_records(path):
            try:
                raw = parse_example(record).get("input_ids")
            except (ValueError, UnicodeDecodeError) as e:
                return problems + [f"{path}: record {rows} is not a valid tf.train.Example ({e})"]
            if raw is None or len(raw) != seq_len * width:
                got = "no input_ids" if raw is None else f"{len(raw)} bytes"
                return problems + [f"{path}: record {rows} has {got}, expected {seq_len} {dtype} ids "
                                   f"({seq_len * width} bytes)"]
            ids = np.frombuffer(raw, "<u2" if width == 2 else "<i4")
            if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
                return problems + [f"{path}: record {rows} has token id {int(ids.max())} or {int(ids.min())} "
                                   f"outside [0, {vocab_size})"]
            rows += 1
    except DataError as e:
        return problems + [str(e)]
    if rows != shard.get("rows"):
        problems.append(f"{path}: {rows} records != manifest rows {shard.get('rows')}")
    return problems


def check(data_dir: str) -> list[str]:
    """Problems found in `data_dir` (empty list when the dataset matches its manifest)."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        return [f"{path}: missing (not a pretokenized dataset, or unfinished)"]
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [f"{path}: invalid JSON ({e})"]
    missing = [k for k in _REQUIRED_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        return [f"{path}: missing keys {missing}"]
    dtype = manifest["dtype"]
    if dtype not in ("uint16", "int32"):
        return [f"{path}: dtype {dtype!r} is neither 'uint16' nor 'int32'"]
    if dtype == "uint16" and manifest["vocab_size"] > 65536:
        return [f"{path}: dtype uint16 cannot hold a vocabulary of {manifest['vocab_size']}"]
    problems = []
    tok = manifest.get("tokenizer") or {}
    for name, expected in (tok.get("sha256") or {}).items():
        file = os.path.join(data_dir, tok.get("dir", "tokenizer"), name)
        if not os.path.isfile(file):
            problems.append(f"{file}: missing (listed in the manifest)")
        else:
            with open(file, "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
            if got != expected:
                problems.append(f"{file}: sha256 {got} != manifest {expected}")
    for split, info in manifest["splits"].items():
        shards = info.get("shards", [])
        for key in ("rows", "tokens"):
            if key in info and info[key] != sum(s.get(key, 0) for s in shards):
                problems.append(f"{path}: split {split} {key} {info[key]} != the sum over its shards")
        for shard in shards:
            problems += _check_shard(os.path.join(data_dir, shard["file"]), shard, int(manifest["seq_len"]),
                                     int(manifest["vocab_size"]), dtype)
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
