"""Pretokenize a text source into packed TFRecord shards plus a manifest (function and CLI).

    python -m data_pipeline.pretokenize --source docstrings --out DIR --vocab-size 8000 --seq-len 128

Steps: read documents -> assign each to train/validation by a stable hash of its text -> train a
WordPiece vocabulary on the train documents only (or load `--vocab`) -> encode -> pack each split into
`[CLS] ... [SEP]` rows -> write `DIR/{split}-{i:05d}-of-{n:05d}.tfrecord` -> write `DIR/manifest.json`.

Each record is a `tf.train.Example` with one bytes feature `input_ids`: the row as little-endian uint16
(int32 for vocabularies above 65536 tokens), i.e. 2 bytes per token instead of the ~3-5 of a varint int64
list. Shards hold contiguous runs of rows, so reading them in file order gives back the packed order.
Every shard is written under a temporary name and renamed when complete, and the manifest is written
last, so a directory with a manifest is always a complete dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.packing import pack_documents
from data_pipeline.sources import iter_documents, split_of
from data_pipeline.tokenization import Tokenizer, train_wordpiece

FORMAT = "bert_jax.pretokenized.v1"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")
MAX_ROWS_PER_SHARD = 50_000
_SHARD_RE = re.compile(r"^(train|validation)-\d{5}-of-\d{5}\.tfrecord(\.tmp)?$")
_ENCODE_BATCH = 1000


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse to replace a finished dataset unless `overwrite`; remove only files this tool writes."""
    manifest = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest):
        if not overwrite:
            raise DataError(f"{out_dir} already holds a pretokenized dataset ({MANIFEST}); "
                            "pass --overwrite to replace it")
        os.remove(manifest)  # first, so a crash below never leaves a manifest next to missing shards
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            path = os.path.join(out_dir, name)
            if _SHARD_RE.match(name) or name.endswith(".json.tmp"):
                os.remove(path)
            elif name == TOKENIZER_DIR and os.path.isdir(path):
                shutil.rmtree(path)
    os.makedirs(out_dir, exist_ok=True)


def _progress(total: int, desc: str):
    from tqdm import tqdm
    # A bar is noise in logs and CI: show it only on an interactive terminal.
    return tqdm(total=total, desc=desc, unit="doc", disable=not sys.stderr.isatty(), leave=False)


def _encode_and_pack(tokenizer: Tokenizer, docs: list[str], seq_len: int, desc: str):
    """(rows [n, seq_len] int32, number of documents that produced at least one token)."""
    counted = [0]

    def encoded():
        with _progress(len(docs), desc) as bar:
            for start in range(0, len(docs), _ENCODE_BATCH):
                batch = docs[start:start + _ENCODE_BATCH]
                for ids in tokenizer.encode_batch(batch):  # multi-threaded inside `tokenizers`
                    counted[0] += bool(ids)
                    yield ids
                bar.update(len(batch))

    rows = list(pack_documents(encoded(), seq_len, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id))
    array = np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)
    return array, counted[0]


def _write_shards(rows: np.ndarray, split: str, out_dir: str, num_shards: int, dtype: str,
                  pad_id: int) -> list[dict]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    encoded = rows.astype("<u2" if dtype == "uint16" else "<i4")
    shards = []
    for i in range(num_shards):
        # Contiguous runs (not round-robin): shard i holds rows [i*n/k, (i+1)*n/k).
        lo, hi = i * len(rows) // num_shards, (i + 1) * len(rows) // num_shards
        name = shard_name(split, i, num_shards)
        final = os.path.join(out_dir, name)
        tmp = final + ".tmp"
        with tf.io.TFRecordWriter(tmp) as writer:
            for row in encoded[lo:hi]:
                feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[row.tobytes()]))
                example = tf.train.Example(features=tf.train.Features(feature={"input_ids": feature}))
                writer.write(example.SerializeToString())
        digest = _sha256(tmp)
        os.replace(tmp, final)
        shards.append({"file": name, "rows": int(hi - lo),
                       "tokens": int(np.count_nonzero(rows[lo:hi] != pad_id)), "sha256": digest})
    return shards


def pretokenize(source: str, out_dir: str, *, vocab_size: int = 8000, seq_len: int = 128,
                vocab: str | None = None, lowercase: bool | None = True, validation_fraction: float = 0.02,
                num_shards: int | None = None, text_field: str = "text", max_documents: int | None = None,
                cache_dir: str | None = None, overwrite: bool = False, txt_mode: str = "block",
                log=None) -> dict:
    """Tokenize, pack and shard `source` into `out_dir`; returns the manifest (also in `out_dir/manifest.json`).

    Args:
      source: "docstrings", "docstrings:stdlib", or a text/JSONL file, folder or glob (see `sources`).
      vocab_size: size of the WordPiece vocabulary to train (ignored when `vocab` is given).
      seq_len: row length in tokens, including [CLS] and [SEP]; 8..65536.
      vocab: an existing vocab.txt or folder holding one; skips training.
      lowercase: uncased (True) or cased (False) tokenizer. With `vocab`, only False overrides the
        vocab's tokenizer_config.json (which otherwise decides; uncased when there is none).
      validation_fraction: share of documents (by text hash) put in the validation split; in [0, 1).
      num_shards: shards per split; default enough for <= 50k rows per shard (at least 1).
      overwrite: replace an existing dataset in `out_dir`; without it that is an error.
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
    if not overwrite and os.path.exists(os.path.join(out_dir, MANIFEST)):
        _prepare_out_dir(out_dir, overwrite=False)  # raises now, before any slow work

    start = time.time()
    split_docs: dict[str, list[str]] = {s: [] for s in SPLITS}
    text_bytes = 0
    for doc in iter_documents(source, text_field=text_field, cache_dir=cache_dir,
                              max_documents=max_documents, txt_mode=txt_mode):
        if doc.strip():
            split_docs[split_of(doc, validation_fraction)].append(doc)
            text_bytes += len(doc.encode("utf-8"))
    if not split_docs["train"]:
        raise DataError(f"source {source!r} gave no non-empty training documents")
    log(f"read {sum(map(len, split_docs.values()))} documents ({text_bytes / 1e6:.1f} MB) "
        f"in {time.time() - start:.1f}s")

    tokenizer = None
    if vocab:
        # Only an explicit cased request overrides the vocab's own tokenizer_config.json: the default
        # (uncased) must not silently lowercase input for a cased vocabulary.
        tokenizer = Tokenizer.load(vocab, lowercase=False if lowercase is False else None)
    _prepare_out_dir(out_dir, overwrite)
    tok_dir = os.path.join(out_dir, TOKENIZER_DIR)
    if tokenizer is None:
        t0 = time.time()
        train_wordpiece(split_docs["train"], vocab_size, tok_dir, lowercase=lowercase is not False)
        tokenizer = Tokenizer.load(tok_dir)
        log(f"trained WordPiece vocab of {tokenizer.vocab_size} in {time.time() - t0:.1f}s")
    else:
        tokenizer.save(tok_dir)

    dtype = "uint16" if tokenizer.vocab_size <= 65536 else "int32"
    splits = {}
    for split in SPLITS:
        t0 = time.time()
        rows, n_docs = _encode_and_pack(tokenizer, split_docs[split], seq_len, desc=split)
        shards_n = num_shards or max(1, math.ceil(len(rows) / MAX_ROWS_PER_SHARD))
        shards = _write_shards(rows, split, out_dir, shards_n, dtype, tokenizer.pad_id)
        splits[split] = {"rows": int(len(rows)), "tokens": int(sum(s["tokens"] for s in shards)),
                         "documents": n_docs, "shards": shards}
        log(f"{split}: {n_docs} documents -> {len(rows)} rows in {shards_n} shards "
            f"({time.time() - t0:.1f}s)")

    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "vocab_size": tokenizer.vocab_size,
        "vocab_hash": tokenizer.vocab_hash,
        "dtype": dtype,
        "lowercase": tokenizer.lowercase,
        "special_ids": {"pad": tokenizer.pad_id, "unk": tokenizer.unk_id, "cls": tokenizer.cls_id,
                        "sep": tokenizer.sep_id, "mask": tokenizer.mask_id},
        "special_token_ids": list(tokenizer.special_ids),
        "tokenizer": {"type": "wordpiece", "dir": TOKENIZER_DIR, "files": tokenizer.files},
        "packing": "full_sentences",
        "source": source,
        "validation_fraction": validation_fraction,
        "text_bytes": text_bytes,
        "splits": splits,
        "created_by": "data_pipeline.pretokenize",
    }
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    log(f"wrote {out_dir} in {time.time() - start:.1f}s")
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.pretokenize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True,
                   help='"docstrings", "docstrings:stdlib", or a text/JSONL(.gz) file, folder or glob')
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=None, help="WordPiece vocabulary to train (default 8000)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row, [CLS] and [SEP] included")
    p.add_argument("--vocab", default=None, help="existing vocab.txt (or folder) to use instead of training")
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: uncased)")
    p.add_argument("--validation-fraction", type=float, default=0.02)
    p.add_argument("--num-shards", type=int, default=None,
                   help=f"shards per split (default: <= {MAX_ROWS_PER_SHARD} rows per shard)")
    p.add_argument("--text-field", default="text", help="JSON field holding the text")
    p.add_argument("--txt-mode", choices=("block", "line"), default="block",
                   help="text files: a document per blank-line-separated block, or per line")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="cache for the docstring corpus")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
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
            validation_fraction=args.validation_fraction, num_shards=args.num_shards,
            text_field=args.text_field, max_documents=args.max_documents, cache_dir=args.cache_dir,
            overwrite=args.overwrite, txt_mode=args.txt_mode, log=log)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['rows']} rows, {info['tokens']} tokens, {len(info['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
