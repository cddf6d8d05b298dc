"""Tests for data_pipeline.packing: documents -> rows of `[CLS] piece [SEP]` segments."""

import numpy as np
import pytest

from data_pipeline.packing import document_features, pack_documents

CLS, SEP, PAD = 2, 3, 0


def pack(docs, seq_len):
    return [r.tolist() for r in pack_documents(docs, seq_len, CLS, SEP, PAD)]


def test_hand_checked_example():
    docs = [[10, 11, 12], [13, 14, 15, 16, 17], [], [18]]
    assert pack(docs, 8) == [
        [CLS, 10, 11, 12, SEP, CLS, 13, SEP],   # doc 2 starts here ...
        [CLS, 14, 15, 16, 17, SEP, PAD, PAD],   # ... and continues (2 slots left: too few for a piece)
        [CLS, 18, SEP, PAD, PAD, PAD, PAD, PAD],  # the empty document left no trace; last row padded
    ]
    assert pack([], 6) == [] and pack([[], []], 6) == []


def test_rows_have_fixed_shape_and_dtype():
    rows = list(pack_documents([np.arange(5, 300)], 16, CLS, SEP, PAD))
    assert all(r.shape == (16,) and r.dtype == np.int32 for r in rows)
    assert len(rows) == int(np.ceil(295 / 14))
    with pytest.raises(ValueError):
        list(pack_documents([[5]], 2, CLS, SEP, PAD))


@pytest.mark.parametrize("seq_len", [3, 8, 13, 64])
def test_every_token_once_in_order_and_segments_are_documents(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = rng.choice([0, 1, 2, 5, seq_len - 3, seq_len - 2, seq_len - 1, 3 * seq_len + 1], size=300)
    docs = [list(rng.integers(5, 1000, size=n)) for n in lengths]
    rows = np.stack(list(pack_documents(docs, seq_len, CLS, SEP, PAD)))
    assert np.all(rows[:, 0] == CLS)

    pieces = []  # (content of each [CLS] ... [SEP] piece), in order
    for i, row in enumerate(rows):
        n = int(np.count_nonzero(row != PAD))
        assert np.all(row[n:] == PAD) and row[n - 1] == SEP
        assert seq_len - n < 3 or i == len(rows) - 1  # padding only where no piece fits, or in the last row
        starts = np.flatnonzero(row[:n] == CLS)
        ends = np.flatnonzero(row[:n] == SEP)
        assert len(starts) == len(ends) and np.all(ends > starts) and np.all(starts[1:] == ends[:-1] + 1)
        pieces += [row[a + 1:b].tolist() for a, b in zip(starts, ends)]
    nonempty = [[int(t) for t in d] for d in docs if d]
    assert [t for p in pieces for t in p] == [t for d in nonempty for t in d]  # every token once, in order
    # Pieces never straddle documents: re-joining consecutive pieces gives back exactly the documents.
    k = 0
    for d in nonempty:
        got = []
        while len(got) < len(d):
            got += pieces[k]
            k += 1
        assert got == d
    assert k == len(pieces)


def test_document_features():
    row = np.array([[CLS, 7, 8, SEP, CLS, 9, SEP, PAD], [CLS, 5, 5, 5, 5, 5, 5, SEP]])
    seg, pos = document_features(row, CLS)
    assert seg.tolist() == [[1, 1, 1, 1, 2, 2, 2, 2], [1] * 8]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], list(range(8))]
