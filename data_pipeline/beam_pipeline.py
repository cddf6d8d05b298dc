"""Pretokenize's encode-and-pack step on Apache Beam (`--runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner`).

The tokenizer is trained (or loaded) once by `pretokenize` before the pipeline starts, as TFDS and seqio do;
the pipeline then replaces only the local process pool:

    splits -> read: each split's documents in order, in numbered batches (one reader per split)
           -> Reshuffle: batches spread over the workers
           -> encode: each worker loads the tokenizer once and writes each batch's ids to OUT/_beam/
           -> GroupByKey(split) -> pack: the batches in their numbered order through the SAME
              `shards.write_split` as the local path, into the same parts; the split's progress entry is
              written to OUT/_beam/{split}.json for the launcher

Why this shape: tokenization is the expensive step and runs in parallel on any number of workers, while the
packing consumes the documents in their original order, so the parts (hence the shards and the manifest,
which `pretokenize` finishes as always) are byte-identical to the local path's, whatever the runner or the
number of workers. The packing stage is one worker per split, streaming the encoded batches from storage
(flat memory); at C4 scale it writes at disk/network speed, far above what one worker tokenizes.

apache_beam is imported only here, and only when a runner is asked for: the local path needs no Beam.
"""

from __future__ import annotations

import io
import json
from typing import Callable, Iterator

import numpy as np

from data_pipeline import encoding
from data_pipeline import manifest as manifest_lib
from data_pipeline import paths
from data_pipeline import shards as shards_lib
from data_pipeline.errors import DataError
from data_pipeline.progress import progress
from data_pipeline.tokenization import Tokenizer

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")
TMP_DIR = "_beam"  # encoded batches and the splits' progress, removed once the manifest is written


def _import_beam():
    try:
        import apache_beam as beam  # pylint: disable=import-outside-toplevel
        from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise DataError("--runner needs Apache Beam: pip install 'bert_jax[beam]'") from None
    return beam, PipelineOptions


def check_runner(runner: str, out_dir: str) -> None:
    """DataError for an unknown runner, a missing Apache Beam, or a Dataflow run into a local folder (its
    workers write the parts, on machines that do not see it), before pretokenize trains or writes anything."""
    if runner not in RUNNERS:
        raise DataError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if runner == "DataflowRunner" and not paths.is_remote(out_dir):
        raise DataError(f"--out {out_dir}: DataflowRunner's workers cannot write a local folder; give a gs:// URL")
    _import_beam()


def _load_tokenizer(tok_dir: str) -> Tokenizer:
    """The tokenizer on a worker: a gs:// folder is copied to the worker's disk first (tokenizer libraries
    read local files only)."""
    return Tokenizer.load(paths.local_copy(tok_dir) if paths.is_remote(tok_dir) else tok_dir)


def _batch_path(tmp_dir: str, split: str, index: int) -> str:
    return paths.join(tmp_dir, f"{split}-{index:09d}.npz")


def _write_batch(path: str, flat: np.ndarray, lengths: np.ndarray, nbytes: list[int]) -> None:
    buf = io.BytesIO()
    np.savez(buf, flat=flat, lengths=lengths, nbytes=np.asarray(nbytes, np.int64))
    with paths.atomic_write(path) as f:
        f.write(buf.getvalue())


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    with np.load(io.BytesIO(paths.read_bytes(path))) as z:
        return z["flat"], z["lengths"], z["nbytes"].tolist()


def _read_batches(documents: Callable[[str], Iterator[str]], split: str):
    """(split, (index, batch of documents)) for the split's documents in their order."""
    for i, batch in enumerate(encoding.batched(documents(split))):
        yield split, (i, batch)


class _Encode:
    """DoFn body: encode one batch with the worker's tokenizer (loaded once), store it, emit (split, index)."""

    def __init__(self, tok_dir: str, tmp_dir: str):
        self.tok_dir, self.tmp_dir, self.tokenizer = tok_dir, tmp_dir, None

    def __call__(self, element):
        split, (index, docs) = element
        if self.tokenizer is None:
            self.tokenizer = _load_tokenizer(self.tok_dir)
        # pylint: disable=protected-access
        _write_batch(_batch_path(self.tmp_dir, split, index), *encoding._encode(self.tokenizer, docs))
        return split, index


def _pack(element, *, out_dir: str, tmp_dir: str, tok_dir: str, shard_rows: int, seq_len: int, dtype: str) -> str:
    """Packs one split's encoded batches, in order, into the local path's parts; its progress entry is
    written to TMP/{split}.json."""
    split, indices = element
    indices = sorted(indices)
    if indices != list(range(len(indices))):
        raise DataError(f"{split}: encoded batches missing from {tmp_dir}")
    tokenizer = _load_tokenizer(tok_dir)
    state = {"parts": [], "complete": False}
    results = (_read_batch(_batch_path(tmp_dir, split, i)) for i in indices)
    with progress(desc=split, unit="B", unit_scale=True) as bar:
        shards_lib.write_split(split, encoding.EncodedDocs(results, bar), out_dir, state, lambda: None,
                               shard_rows=shard_rows, seq_len=seq_len, tokenizer=tokenizer, dtype=dtype)
    manifest_lib.write_json(paths.join(tmp_dir, f"{split}.json"), state)
    return split


def encode_splits(splits: list[str], state: dict, out_dir: str, documents: Callable[[str], Iterator[str]], *,
                  tok_dir: str, runner: str, beam_args: list[str], shard_rows: int, seq_len: int, dtype: str,
                  log) -> None:
    """Runs the pipeline for `splits` (those not complete in `state`) and records their parts in `state`,
    as the local path's `_encode_split` does. `tok_dir`: the tokenizer folder the workers read (under
    `out_dir`, so on a bucket for a remote run). `beam_args`: pipeline options (--project, --region, ...)."""
    beam, pipeline_options = _import_beam()
    tmp_dir = paths.join(out_dir, TMP_DIR)
    if paths.exists(tmp_dir):
        paths.rmtree(tmp_dir)
    paths.makedirs(tmp_dir)
    for split in splits:  # a split is redone whole: drop a killed local run's parts of it
        state["splits"][split] = {"parts": [], "complete": False}
        shards_lib.remove_unrecorded_parts(out_dir, split, state["splits"][split])
    options = pipeline_options([f"--runner={runner}", *beam_args])
    pack_args = {"out_dir": out_dir, "tmp_dir": tmp_dir, "tok_dir": tok_dir, "shard_rows": shard_rows,
                 "seq_len": seq_len, "dtype": dtype}
    log(f"Beam {runner}: encoding {', '.join(splits)}")
    with beam.Pipeline(runner=_local_runner() if runner == "DirectRunner" else None, options=options) as p:
        _ = (p
             | "splits" >> beam.Create(splits)
             | "read" >> beam.FlatMap(_read_batches_of, documents)
             | "spread" >> beam.Reshuffle()
             | "encode" >> beam.Map(_Encode(tok_dir, tmp_dir))
             | "by split" >> beam.GroupByKey()
             | "pack" >> beam.Map(_pack, **pack_args))
    for split in splits:
        state["splits"][split] = json.loads(paths.read_text(paths.join(tmp_dir, f"{split}.json")))


def _local_runner():
    """What `--runner DirectRunner` runs: Beam's FnApiRunner (direct_num_workers, direct_running_mode apply).
    Beam's own DirectRunner first tries its Prism runner, which looks for its binary on github.com (a name
    lookup on a machine that must not reach out, and seconds lost) and then falls back to this runner."""
    from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=import-outside-toplevel
    return fn_runner.FnApiRunner()


def _read_batches_of(split: str, documents):
    return _read_batches(documents, split)


def remove_tmp(out_dir: str) -> None:
    """Deletes the pipeline's scratch folder once the manifest is written."""
    tmp_dir = paths.join(out_dir, TMP_DIR)
    if paths.exists(tmp_dir):
        paths.rmtree(tmp_dir)
