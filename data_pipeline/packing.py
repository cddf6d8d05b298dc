"""Packing tokenized documents into fixed-length BERT rows (pure numpy), one segment per document piece.

Documents are laid out one after the other; every piece of a document that lands in a row is written as
`[CLS] tokens [SEP]`. A document longer than the space left continues in the next row, which starts with
`[CLS]` again; no tokens are dropped. When fewer than 3 slots are left in a row (not enough for `[CLS] x
[SEP]`), the row is closed with padding. Only that tail and the very last row are padded.

Why `[CLS]` per piece: the shard format stays "token ids only", and the reader derives everything the
model needs from the ids alone (`document_features`): segment id = number of `[CLS]` seen so far, position
= index - start of its segment. The model then blocks attention between segments and restarts positions at
each one, so a packed row computes exactly what each document alone would (tests/test_document_attention.py).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


def pack_documents(docs: Iterable[list[int]], seq_len: int, cls_id: int, sep_id: int,
                   pad_id: int) -> Iterator[np.ndarray]:
    """Pack token-id documents into rows of exactly `seq_len` int32: `[CLS] piece [SEP] [CLS] piece [SEP] ... PAD`.

    Args:
      docs: token ids of each document, without special tokens; empty documents are skipped.
      seq_len: row length, >= 3.
      cls_id, sep_id, pad_id: special token ids.

    Yields:
      np.int32 arrays of shape [seq_len]; every row starts with `[CLS]`.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 to hold [CLS] x [SEP], got {seq_len}")
    row = np.full(seq_len, pad_id, np.int32)
    fill = 0  # slots used in `row`

    for doc in docs:
        tokens = np.asarray(doc, dtype=np.int32).reshape(-1)
        pos = 0
        while pos < tokens.size:
            if seq_len - fill < 3:  # no room for another piece: close the row (padding is already there)
                yield row
                row, fill = np.full(seq_len, pad_id, np.int32), 0
            take = min(seq_len - fill - 2, tokens.size - pos)
            row[fill] = cls_id
            row[fill + 1:fill + 1 + take] = tokens[pos:pos + take]
            row[fill + 1 + take] = sep_id
            fill += take + 2
            pos += take
    if fill > 0:
        yield row


def document_features(ids: np.ndarray, cls_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference (numpy) derivation of (segment ids, positions) from packed rows [..., S]; the model-side
    twin is bert_jax.models.encoder.document_features. Padding belongs to the last segment."""
    is_cls = ids == cls_id
    segments = np.cumsum(is_cls, axis=-1)
    idx = np.broadcast_to(np.arange(ids.shape[-1]), ids.shape)
    start = np.maximum.accumulate(np.where(is_cls, idx, 0), axis=-1)
    return segments.astype(np.int32), (idx - start).astype(np.int32)
