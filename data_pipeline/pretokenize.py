"""Pretokenize a text source into packed TFRecord shards plus a manifest (function and CLI).

    python -m data_pipeline.pretokenize --source docstrings --out DIR --vocab-size 8000 --seq-len 128

Steps: stream documents -> assign each to train/validation by a stable hash of its text -> train a
tokenizer on the train documents only (WordPiece, SentencePiece or byte-level BPE), or load `--vocab` -> per split:
encode batches of documents in a process pool (results in input order, `data_pipeline.encoding`) -> pack
into `[CLS] ... [SEP]` rows -> write parts of `--shard-rows` rows -> name the finished shards
`DIR/{split}-{i:05d}-of-{n:05d}.tfrecord` (`data_pipeline.shards`) -> write `DIR/manifest.json`
(`data_pipeline.manifest`).

`--source` and `--out` may be object-store URLs (gs://bucket/folder; `data_pipeline.paths`): each part and
shard is uploaded as one object once complete, the tokenizer is trained in a local folder and uploaded,
and the manifest, uploaded last, is what makes the dataset visible.

Memory stays flat: documents are streamed (the source is read once per split, plus once to train a
tokenizer), at most a few batches are in flight, and rows go to disk as a part fills.

Resumable and idempotent: each part restarts packing at a document boundary, is written under a
temporary name and renamed when complete, and `DIR/progress.json` then records it with the number of
documents it consumed. A killed run restarted with the same arguments skips those documents and goes on,
giving bitwise the same shards as an uninterrupted run. A finished directory (with its manifest) is left
untouched by a re-run with the same arguments; other arguments are refused unless `--overwrite`.
The output does not depend on the number of worker processes.

The record format (a `tf.train.Example` per row, ids as little-endian uint16 or int32) is
`data_pipeline.records`.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator

from data_pipeline import encoding
from data_pipeline import manifest as manifest_lib
from data_pipeline import paths
from data_pipeline import records
from data_pipeline import shards as shards_lib
from data_pipeline.errors import DataError
from data_pipeline.manifest import Manifest, SpecialIds, Split, TokenizerFiles
from data_pipeline.progress import progress
from data_pipeline.sources import iter_documents, source_bytes
from data_pipeline.splitting import split_of
from data_pipeline.tokenization import Tokenizer
from data_pipeline.tokenizer_training import train_tokenizer

SPLITS = manifest_lib.SPLITS
TOKENIZERS = ("wordpiece", "sentencepiece-unigram", "sentencepiece-bpe", "bytelevel-bpe")
MAX_ROWS_PER_SHARD = 50_000


def _check_arguments(*, seq_len: int, vocab: str | None, vocab_size: int, validation_fraction: float,
                     num_shards: int | None, shard_rows: int | None, tokenizer: str | None, workers: int,
                     tokenizer_train_documents: int | None) -> None:
    """DataError for the first impossible argument, before anything is read or written."""
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
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if tokenizer_train_documents is not None and tokenizer_train_documents < 1:
        raise DataError(f"tokenizer_train_documents must be >= 1, got {tokenizer_train_documents}")


def _load_given_tokenizer(vocab: str, kind: str | None, lowercase: bool | None) -> Tokenizer:
    # Only an explicit cased request overrides the vocab's own config: the default (uncased) must not silently
    # lowercase input for a cased vocabulary.
    tok = Tokenizer.load(vocab, lowercase=False if lowercase is False else None)
    family = lambda k: k if k in ("wordpiece", "bytelevel-bpe") else "other"  # noqa: E731
    if kind is not None and family(kind) != family(tok.kind):
        raise DataError(f"--tokenizer {kind} does not match {vocab} (a {tok.kind} tokenizer)")
    return tok


def _read_json(path: str):
    try:
        with paths.open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}); pass --overwrite to start over") from None


def _existing_run(out_dir: str, args: dict, overwrite: bool, log) -> tuple[Manifest | None, dict | None]:
    """What `out_dir` already holds: (its manifest, None) when it is complete with these `args` (nothing to do),
    (None, progress state) for an unfinished run to resume, (None, None) to start afresh (after clearing
    this tool's files). DataError when it holds a run with other arguments and not `overwrite`."""
    manifest_path = manifest_lib.path(out_dir)
    progress_path = paths.join(out_dir, shards_lib.PROGRESS)
    if paths.isdir(out_dir) and overwrite:
        shards_lib.clear_tool_files(out_dir)
    elif paths.exists(manifest_path):
        obj = _read_json(manifest_path)
        if isinstance(obj, dict) and obj.get("args") == args:
            manifest = Manifest.from_json(obj, manifest_path)
            shards_lib.remove_leftovers(out_dir, manifest)
            log(f"{out_dir} is already complete with these arguments: nothing to do")
            return manifest, None
        raise DataError(f"{out_dir} already holds a pretokenized dataset ({manifest_lib.FILENAME}) made with "
                        "other arguments; pass --overwrite to replace it")
    elif paths.exists(progress_path):
        state = _read_json(progress_path)
        if not isinstance(state, dict) or state.get("args") != args:
            raise DataError(f"{out_dir} holds an unfinished run ({shards_lib.PROGRESS}) with other arguments; "
                            "run again with the same arguments to resume, or pass --overwrite to start over")
        log("resuming: " + ", ".join(f"{s} {len(v['parts'])} parts" for s, v in state["splits"].items()))
        return None, state
    elif paths.isdir(out_dir):
        shards_lib.clear_tool_files(out_dir)  # a run killed before its first progress.json: nothing to keep
    return None, None


def _train_tokenizer(kind: str, documents: Iterable[str], vocab_size: int, tok_dir: str, lowercase: bool,
                     source: str) -> Tokenizer:
    """Trains a `kind` tokenizer on `documents` into `tok_dir` (with a progress bar) and loads it."""
    seen = 0

    def counted(docs):
        nonlocal seen
        with progress(desc="tokenizer training: reading", unit="doc") as bar:
            for d in docs:
                seen += 1
                bar.update(1)
                yield d

    train_tokenizer(kind, counted(documents), vocab_size, tok_dir, lowercase=lowercase)
    if not seen:
        raise DataError(f"source {source!r} gave no non-empty training documents")
    return Tokenizer.load(tok_dir)


def _get_tokenizer(tok_dir: str, state: dict | None, given: Tokenizer | None,
                   train_documents: Callable[[], Iterable[str]], *, kind: str, vocab_size: int, lowercase: bool,
                   source: str, log) -> Tokenizer:
    """The run's tokenizer, saved in `tok_dir`: the resumed run's, the given one, or one trained now."""
    if state is not None:
        tok = Tokenizer.load(tok_dir)
        if tok.vocab_hash != state["vocab_hash"]:
            raise DataError(f"{tok_dir}: vocab hash differs from {shards_lib.PROGRESS}; pass --overwrite to start "
                            "over")
        return tok
    if given is not None:
        given.save(tok_dir)
        return given
    start = time.time()
    tok = _train_tokenizer(kind, train_documents(), vocab_size, tok_dir, lowercase, source)
    log(f"trained {tok.kind} vocab of {tok.vocab_size} in {time.time() - start:.1f}s")
    return tok


def _local_tokenizer_dir(tok_dir: str, resuming: bool) -> str:
    """Where this run keeps its tokenizer files: `tok_dir` itself on a local disk. For an object-store
    `--out` a local folder (the encoding workers and the tokenizer libraries read local files only): the
    resumed run's tokenizer downloaded from `tok_dir`, or an empty one that is uploaded to `tok_dir` once
    the tokenizer is trained or saved."""
    if not paths.is_remote(tok_dir):
        return tok_dir
    if resuming:
        return paths.local_copy(tok_dir)
    local = tempfile.mkdtemp(prefix="bert_jax_tokenizer_")
    atexit.register(shutil.rmtree, local, True)
    return local


def _document_reader(source: str, validation_fraction: float, **source_args) -> Callable[[str], Iterator[str]]:
    """documents(split): the source's non-empty documents of `split`, streamed afresh on each call."""

    def read() -> Iterable[str]:
        return iter_documents(source, **source_args)

    # The source is read once per split (and once more to train a tokenizer). The docstring corpus is built in
    # memory anyway (tens of MB at most), so it is built once instead.
    corpus = list(read()) if source.startswith("docstrings") else None

    def documents(split: str) -> Iterator[str]:
        docs = corpus if corpus is not None else read()
        return (d for d in docs if d.strip() and split_of(d, validation_fraction) == split)

    return documents


def _encode_split(split: str, state: dict, out_dir: str, documents: Callable[[str], Iterator[str]],
                  encoder: encoding.Encoder, save: Callable[[], None], *, total_bytes: int | None, shard_rows: int,
                  seq_len: int, dtype: str, log) -> None:
    """Encodes, packs and writes the parts of `split` that `state` (the split's progress) does not hold yet."""
    shards_lib.remove_unrecorded_parts(out_dir, split, state)
    t0 = time.time()
    skip = sum(p["consumed"] for p in state["parts"])
    batches = encoding.batched(itertools.islice(documents(split), skip, None))
    with progress(desc=f"{split}", unit="B", unit_scale=True,
                  total=total_bytes if split == "train" and not skip else None) as bar:
        docs = encoding.EncodedDocs(encoder.encode(batches), bar)
        shards_lib.write_split(split, docs, out_dir, state, save, shard_rows=shard_rows, seq_len=seq_len,
                               tokenizer=encoder.tokenizer, dtype=dtype)
    seconds = max(time.time() - t0, 1e-9)
    n_docs = sum(p["consumed"] for p in state["parts"]) - skip
    log(f"{split}: {n_docs} documents, {docs.bytes / 1e6:.1f} MB in {seconds:.1f}s "
        f"({n_docs / seconds:.0f} docs/s, {docs.bytes / 1e6 / seconds:.2f} MB/s, {encoder.workers} workers)")


def _finish_splits(state: dict, out_dir: str, num_shards: int | None, pad_id: int, dtype: str) -> dict[str, Split]:
    """Names (or re-cuts) every split's final shards; the manifest's split entries."""
    splits = {}
    for split in SPLITS:
        split_state = state["splits"][split]
        shards = shards_lib.finalize_split(split, split_state, out_dir, num_shards, pad_id, dtype)
        splits[split] = Split(rows=sum(s.rows for s in shards), tokens=sum(s.tokens for s in shards),
                              documents=sum(p["documents"] for p in split_state["parts"]), shards=tuple(shards))
    return splits


def _manifest(tok: Tokenizer, tok_dir: str, splits: dict[str, Split], state: dict, *, seq_len: int, dtype: str,
              source: str, validation_fraction: float, args: dict) -> Manifest:
    """The manifest of the finished run: shapes, the tokenizer and its files, the splits, the arguments."""
    return Manifest(
        seq_len=seq_len, vocab_size=tok.vocab_size, dtype=dtype,
        special_ids=SpecialIds(pad=tok.pad_id, unk=tok.unk_id, cls=tok.cls_id, sep=tok.sep_id, mask=tok.mask_id),
        splits=splits, vocab_hash=tok.vocab_hash, lowercase=tok.lowercase,
        special_token_ids=tuple(tok.special_ids),
        tokenizer=TokenizerFiles(type=tok.kind, dir=shards_lib.TOKENIZER_DIR, files=tuple(tok.files),
                                 sha256={f: records.file_sha256(os.path.join(tok_dir, f)) for f in tok.files}),
        packing="full_sentences", source=source, validation_fraction=validation_fraction,
        text_bytes=sum(p["text_bytes"] for s in SPLITS for p in state["splits"][s]["parts"]),
        args=args, created_by="data_pipeline.pretokenize")


def pretokenize(source: str, out_dir: str, *, vocab_size: int = 8000, seq_len: int = 128,
                vocab: str | None = None, lowercase: bool | None = True, validation_fraction: float = 0.02,
                num_shards: int | None = None, shard_rows: int | None = None, text_field: str = "text",
                max_documents: int | None = None, cache_dir: str | None = None, overwrite: bool = False,
                txt_mode: str = "block", tokenizer: str | None = None, tfds_split: str = "train",
                tfds_data_dir: str | None = None, workers: int | None = None,
                tokenizer_train_documents: int | None = None, runner: str | None = None,
                beam_args: list[str] | None = None, log=None) -> Manifest:
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
      tokenizer: "wordpiece" (default), "sentencepiece-unigram", "sentencepiece-bpe" or "bytelevel-bpe" (RoBERTa's;
        pass lowercase=False, --cased, for RoBERTa's cased tokenizer).
      tfds_split, tfds_data_dir: the TFDS split and data folder of a "tfds:NAME" source (feature: `text_field`).
      workers: encoding processes (default: all cores); the output does not depend on it.
      tokenizer_train_documents: train the tokenizer on only the first N train documents (default: all); a
        vocabulary needs far less text than a large corpus holds.
      overwrite: replace an existing dataset or unfinished run in `out_dir` made with other arguments.
      runner: encode and pack on Apache Beam with this runner (`data_pipeline.beam_pipeline`; same shards and
        manifest), `beam_args` its pipeline options; None: the local process pool.
    """
    log = log or (lambda msg: None)
    workers = workers or os.cpu_count() or 1
    _check_arguments(seq_len=seq_len, vocab=vocab, vocab_size=vocab_size, validation_fraction=validation_fraction,
                     num_shards=num_shards, shard_rows=shard_rows, tokenizer=tokenizer, workers=workers,
                     tokenizer_train_documents=tokenizer_train_documents)
    if runner is not None:  # before anything is trained or written: Beam installed, a known runner
        from data_pipeline import beam_pipeline  # pylint: disable=import-outside-toplevel  (Beam is optional)
        beam_pipeline.check_runner(runner, out_dir)
    shard_rows = shard_rows or MAX_ROWS_PER_SHARD
    given = _load_given_tokenizer(vocab, tokenizer, lowercase) if vocab else None
    is_tfds = source.startswith("tfds:")
    # The run's identity: a re-run with the same args is a no-op (finished) or a resume (unfinished).
    args: dict[str, Any] = {
        "source": source, "text_field": text_field, "txt_mode": txt_mode, "max_documents": max_documents,
        "tfds_split": tfds_split if is_tfds else None, "tfds_data_dir": tfds_data_dir if is_tfds else None,
        "seq_len": seq_len, "validation_fraction": validation_fraction, "num_shards": num_shards,
        "shard_rows": shard_rows, "tokenizer": given.kind if given else (tokenizer or "wordpiece"),
        "vocab_hash": given.vocab_hash if given else None, "vocab_size": None if given else vocab_size,
        "tokenizer_train_documents": None if given else tokenizer_train_documents,
        "lowercase": given.lowercase if given else lowercase is not False}

    total_bytes = source_bytes(source)  # also: a source that matches no file fails here, before any change
    done, state = _existing_run(out_dir, args, overwrite, log)
    if done is not None:
        return done
    paths.makedirs(out_dir)
    documents = _document_reader(source, validation_fraction, text_field=text_field, cache_dir=cache_dir,
                                 max_documents=max_documents, txt_mode=txt_mode, tfds_split=tfds_split,
                                 tfds_data_dir=tfds_data_dir)
    start = time.time()
    tok_dir = _local_tokenizer_dir(paths.join(out_dir, shards_lib.TOKENIZER_DIR), resuming=state is not None)
    tok = _get_tokenizer(tok_dir, state, given,
                         lambda: itertools.islice(documents("train"), tokenizer_train_documents),
                         kind=args["tokenizer"], vocab_size=vocab_size, lowercase=lowercase is not False,
                         source=source, log=log)
    if paths.is_remote(out_dir) and state is None:  # published before progress.json names the run
        paths.copy_tree(tok_dir, paths.join(out_dir, shards_lib.TOKENIZER_DIR))
    progress_path = paths.join(out_dir, shards_lib.PROGRESS)
    if state is None:
        state = {"args": args, "vocab_hash": tok.vocab_hash,
                 "splits": {s: {"parts": [], "complete": False} for s in SPLITS}}
        manifest_lib.write_json(progress_path, state)

    dtype = "uint16" if tok.vocab_size <= 65536 else "int32"
    if runner is not None:
        _encode_on_beam(state, out_dir, documents, runner=runner, beam_args=beam_args or [],
                        shard_rows=shard_rows, seq_len=seq_len, dtype=dtype, log=log)
        manifest_lib.write_json(progress_path, state)
    with encoding.Encoder(tok, tok_dir, workers) as encoder:  # one worker pool for both splits
        for split in SPLITS:
            if not state["splits"][split]["complete"]:
                _encode_split(split, state["splits"][split], out_dir, documents, encoder,
                              lambda: manifest_lib.write_json(progress_path, state), total_bytes=total_bytes,
                              shard_rows=shard_rows, seq_len=seq_len, dtype=dtype, log=log)
    if not sum(p["documents"] for p in state["splits"]["train"]["parts"]):
        raise DataError(f"source {source!r} gave no non-empty training documents")
    splits = _finish_splits(state, out_dir, num_shards, tok.pad_id, dtype)
    manifest = _manifest(tok, tok_dir, splits, state, seq_len=seq_len, dtype=dtype, source=source,
                         validation_fraction=validation_fraction, args=args)
    manifest_lib.write(out_dir, manifest)
    shards_lib.remove_leftovers(out_dir, manifest)
    if runner is not None:
        from data_pipeline import beam_pipeline  # pylint: disable=import-outside-toplevel  (Beam is optional)
        beam_pipeline.remove_tmp(out_dir)
    log(f"wrote {out_dir} in {time.time() - start:.1f}s")
    return manifest


def _encode_on_beam(state: dict, out_dir: str, documents, **kwargs) -> None:
    """The splits not yet complete, encoded and packed by an Apache Beam pipeline into `state`."""
    from data_pipeline import beam_pipeline  # pylint: disable=import-outside-toplevel  (Beam is optional)
    splits = [s for s in SPLITS if not state["splits"][s]["complete"]]
    if splits:
        beam_pipeline.encode_splits(splits, state, out_dir, documents,
                                    tok_dir=paths.join(out_dir, shards_lib.TOKENIZER_DIR), **kwargs)


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
                   help="existing vocab.txt, tokenizer.json, SentencePiece .model, or a folder holding one (or a "
                        "byte-level vocab.json + merges.txt) instead of training")
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
    p.add_argument("--runner", default=None, metavar="RUNNER",
                   help="encode and pack on Apache Beam: DirectRunner, DataflowRunner, FlinkRunner or SparkRunner "
                        "(pip install 'bert_jax[beam]'); "
                        "unknown --flags are passed to Beam as pipeline options (--project, --region, ...)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset or unfinished run in --out made with other arguments")
    return p


def main(argv=None) -> int:
    args, beam_args = _parser().parse_known_args(argv)
    if beam_args and args.runner is None:
        _parser().error(f"unrecognized arguments: {' '.join(beam_args)}")
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
            tokenizer_train_documents=args.tokenizer_train_documents, runner=args.runner, beam_args=beam_args,
            log=log)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, info in manifest.splits.items():
        print(f"{split}: {info.rows} rows, {info.tokens} tokens, {len(info.shards)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
