"""Test support shared by several test files."""

import os

import numpy as np

from data_pipeline import records
from data_pipeline.manifest import Shard
from data_pipeline.shards import shard_name


def write_shards(rows: np.ndarray, split: str, out_dir: str, num_shards: int, dtype: str, pad_id: int) -> list[Shard]:
    """An in-memory array of rows [n, seq_len] as `num_shards` contiguous shards in pretokenize's format (for
    tests that need a precise layout of rows); their manifest entries."""
    shards = []
    for i in range(num_shards):
        lo, hi = i * len(rows) // num_shards, (i + 1) * len(rows) // num_shards
        name = shard_name(split, i, num_shards)
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(records.frame_records([records.serialize_row(r, dtype) for r in rows[lo:hi]]))
        shards.append(Shard(file=name, rows=int(hi - lo), tokens=int(np.count_nonzero(rows[lo:hi] != pad_id)),
                            sha256=records.file_sha256(path)))
    return shards
