"""Packing tokenized documents into fixed-length BERT rows (pure numpy).

"Full sentences" packing as in RoBERTa: documents are concatenated into one token stream, each followed
by `[SEP]`, and the stream is cut into chunks of `seq_len - 2` tokens; every row is
`[CLS] chunk [SEP]`. A long document simply continues in the next row, so no tokens are dropped and
almost no padding is spent (only the very last row is padded). Attention is not blocked between
documents of one row; the `[SEP]` between them is the only boundary marker.

Two small rules keep rows clean:
- when a document ends exactly at the end of a row, its `[SEP]` is not carried over to start the next
  row: the row's closing `[SEP]` already ends that document;
- the last document's `[SEP]` is dropped for the same reason: the final row's closing `[SEP]` ends it.
A document that ends one token before the end of a row gives a row ending in `[SEP] [SEP]` (harmless,
and rare: about one row in `seq_len`).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


def pack_documents(docs: Iterable[list[int]], seq_len: int, cls_id: int, sep_id: int,
                   pad_id: int) -> Iterator[np.ndarray]:
    """Pack token-id documents into rows `[CLS] tokens... [SEP] (PAD...)` of exactly `seq_len` int32.

    Args:
      docs: token ids of each document, without special tokens; empty documents are skipped.
      seq_len: row length, >= 3.
      cls_id, sep_id, pad_id: special token ids.

    Yields:
      np.int32 arrays of shape [seq_len]. All rows but the last are full; the last is padded with
      `pad_id` after its closing `[SEP]`.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 to hold [CLS] x [SEP], got {seq_len}")
    body = seq_len - 2
    buf = np.empty(body, np.int32)  # content of the row being filled (between [CLS] and [SEP])
    fill = 0
    sep_pending = False  # the previous document's [SEP] has not been written yet

    def row(n: int) -> np.ndarray:
        out = np.full(seq_len, pad_id, np.int32)
        out[0] = cls_id
        out[1:1 + n] = buf[:n]
        out[1 + n] = sep_id
        return out

    for doc in docs:
        tokens = np.asarray(doc, dtype=np.int32).reshape(-1)
        if tokens.size == 0:
            continue
        if sep_pending and fill > 0:  # fill == 0: the previous row's closing [SEP] ended that document
            buf[fill] = sep_id
            fill += 1
            if fill == body:
                yield row(fill)
                fill = 0
        pos = 0
        while pos < tokens.size:
            take = min(body - fill, tokens.size - pos)
            buf[fill:fill + take] = tokens[pos:pos + take]
            fill += take
            pos += take
            if fill == body:
                yield row(fill)
                fill = 0
        sep_pending = True
    if fill > 0:
        yield row(fill)
