"""The input side of training: this host's `tf.data` batches -> global `jax.Array`s on the mesh.

Each host reads its own shards (data_pipeline.dataset: shards[process_index::process_count]) in batches of
`batch_size // process_count` rows; `jax.make_array_from_process_local_data` assembles the global batch
from the hosts' slices, and `prefetch.to_device` keeps two batches transferred ahead of the step.
The evaluation batches are read once and kept on device (fixed rows every evaluation), as many as every
host can read (`eval_batch_count`). A resumed run starts the stream at the batch its checkpoint had
consumed (`CheckpointMeta.data_batches`), reading at most one window of shards to get there.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
from ml_collections import ConfigDict

from bert_jax import prefetch
from data_pipeline import dataset as data_lib
from data_pipeline.manifest import Manifest


@dataclasses.dataclass(frozen=True)
class InputSettings:
    """The `data` section, typed (see configs/common.py for each key)."""

    dir: str
    seq_len: int
    shuffle_buffer: int
    seed: int
    window_shards: int
    skip_corrupt_shards: bool

    @classmethod
    def from_section(cls, d: ConfigDict) -> "InputSettings":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def eval_batch_count(manifest: Manifest, split: str, host_batch: int, process_count: int, cap: int) -> int:
    """Evaluation batches per step that EVERY host can read: the same number on all hosts, computed from the
    manifest alone, so no host waits in a collective for a host whose shards ran out.

    Host p reads shards[p::process_count] (data_pipeline.dataset); each host yields host_batch rows per batch."""
    info = manifest.splits[split]
    per_host = [info.host_rows(p, process_count) // host_batch for p in range(process_count)]
    return max(0, min(cap, *per_host)) if per_host else 0


def check_train_shards(settings: InputSettings, manifest: Manifest) -> None:
    """Unless corrupt shards are to be skipped, a truncated shard of this host is an error now, before any
    compile (8 bytes read per shard)."""
    if not settings.skip_corrupt_shards:
        data_lib.check_shards(settings.dir, manifest, "train", jax.process_index(), jax.process_count())


def to_global(batch: dict, sharding) -> dict:
    """This host's slice of a batch (numpy) -> the global batch (jax.Arrays laid out by `sharding`)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def host_batch_size(global_batch: int) -> int:
    return global_batch // jax.process_count()


def train_stream(settings: InputSettings, global_batch: int, sharding, skip_batches: int = 0):
    """-> (the tf.data dataset, an iterator of global batches with two transferred ahead): endless, shuffled,
    starting at batch `skip_batches` of the stream. The dataset's `.plan.position(n)` is the position to
    save after n batches; its `.stream_stats` counts skipped shards."""
    ds = data_lib.make_dataset(
        settings.dir, "train", host_batch_size(global_batch), shuffle=True, repeat=True, seed=settings.seed,
        shuffle_buffer=settings.shuffle_buffer, process_index=jax.process_index(),
        process_count=jax.process_count(), window_shards=settings.window_shards,
        skip_corrupt_shards=settings.skip_corrupt_shards, skip_batches=skip_batches)
    batches: Iterator = prefetch.to_device(data_lib.as_numpy(ds), lambda b: to_global(b, sharding), size=2)
    return ds, batches


def eval_batches(settings: InputSettings, manifest: Manifest, global_batch: int, cap: int, sharding) -> list:
    """The validation batches of every evaluation, as global arrays: the same rows each time, in file order."""
    host_batch = host_batch_size(global_batch)
    n = eval_batch_count(manifest, "validation", host_batch, jax.process_count(), cap)  # the same on every host
    ds = data_lib.make_dataset(settings.dir, "validation", host_batch, shuffle=False, repeat=False,
                               process_index=jax.process_index(), process_count=jax.process_count())
    return [to_global(b, sharding) for _, b in zip(range(n), data_lib.as_numpy(ds))]
