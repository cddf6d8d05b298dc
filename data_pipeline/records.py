"""The shard record format, written and read without TensorFlow: one owner for both directions.

A shard is a TFRecord file: each record is framed as

    uint64 length | uint32 masked crc32c(length) | payload | uint32 masked crc32c(payload)

(little-endian). Each payload is a `tf.train.Example` with the bytes feature `input_ids`: the packed row as
little-endian uint16 (int32 for vocabularies above 65536 tokens), 2 bytes per token instead of the ~3-5 of
a varint int64 list. The bytes equal TensorFlow's own writer and serializer (tests read them back with
tf.data); encoding them here keeps TensorFlow out of pretokenize and validate.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import struct
from typing import Iterator

import numpy as np

from data_pipeline import paths
from data_pipeline.errors import DataError

HEADER_BYTES = 12  # uint64 length + its uint32 crc
FOOTER_BYTES = 4  # the payload's uint32 crc


def numpy_dtype(dtype: str) -> str:
    """The little-endian numpy dtype of a manifest dtype ("uint16" or "int32")."""
    return "<u2" if dtype == "uint16" else "<i4"


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with paths.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- writing: a hand-encoded tf.train.Example (one bytes feature per row field) ------------------------------

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


def serialize_row(row: np.ndarray, dtype: str) -> bytes:
    """`tf.train.Example` bytes of one packed row [seq_len]: the bytes feature `input_ids`, the ids stored
    little-endian in `dtype`. Same bytes as TensorFlow's serializer (map entry -> Feature -> BytesList -> bytes)."""
    raw = np.asarray(row).astype(numpy_dtype(dtype)).tobytes()
    return _example_prefix("input_ids", len(raw)) + raw


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


# ---- reading ---------------------------------------------------------------------------------------------

def framed_records(path: str) -> Iterator[bytes]:
    """Whole framed records (length, crc, payload, crc) of a TFRecord file, to copy without re-encoding;
    the payload is `record[HEADER_BYTES:-FOOTER_BYTES]`."""
    with paths.open(path, "rb") as f:
        while True:
            header = f.read(HEADER_BYTES)
            if not header:
                return
            (length,) = np.frombuffer(header[:8], "<u8")
            yield header + f.read(int(length) + FOOTER_BYTES)


def read_records(path: str) -> Iterator[bytes]:
    """Payloads of a TFRecord file; DataError when truncated.

    CRCs are not checked: validate's sha256 comparison against the manifest already catches corrupted bytes."""
    n = 0
    size = paths.getsize(path)
    with paths.open(path, "rb") as f:
        while True:
            header = f.read(HEADER_BYTES)
            if not header:
                return
            if len(header) < HEADER_BYTES:
                raise DataError(f"{path}: truncated record header after {n} records")
            (length,) = struct.unpack("<Q", header[:8])
            if f.tell() + length + FOOTER_BYTES > size:
                raise DataError(f"{path}: truncated record {n}")
            payload = f.read(length)
            f.seek(FOOTER_BYTES, os.SEEK_CUR)
            yield payload
            n += 1


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
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


def message_fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a serialized protobuf message, in order: an int for
    varints (wire 0), the payload for length-delimited fields (2), the raw 8 or 4 bytes for fixed64/fixed32
    (1, 5); ValueError if malformed."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield key >> 3, wire, value


def _fields(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """(field number, payload) of the length-delimited fields of a protobuf message; other wire types skipped."""
    return ((number, value) for number, wire, value in message_fields(buf) if wire == 2)


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
