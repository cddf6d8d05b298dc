"""Tests for data_pipeline.packing: full-sentence packing of documents into [CLS] ... [SEP] rows."""

import numpy as np
import pytest

from data_pipeline.packing import pack_documents

CLS, SEP, PAD = 2, 3, 0


def pack(docs, seq_len):
    return [r.tolist() for r in pack_documents(docs, seq_len, CLS, SEP, PAD)]


def test_hand_checked_example():
    docs = [[10, 11, 12], [13, 14, 15, 16, 17], [], [18]]
    # content per row is 4 tokens; stream: 10 11 12 S 13 14 15 16 | 17 S 18 (final S is the closing one)
    assert pack(docs, 6) == [
        [CLS, 10, 11, 12, SEP, SEP],   # doc 1 ends one token before the row end: [SEP] [SEP]
        [CLS, 13, 14, 15, 16, SEP],    # doc 2 continues in the next row
        [CLS, 17, SEP, 18, SEP, PAD],  # the empty document left no trace; final row padded
    ]


def test_document_ending_at_row_end_does_not_start_next_row_with_sep():
    assert pack([[7, 7, 7, 7], [8]], 6) == [[CLS, 7, 7, 7, 7, SEP], [CLS, 8, SEP, PAD, PAD, PAD]]
    assert pack([[7, 7, 7, 7]], 6) == [[CLS, 7, 7, 7, 7, SEP]]
    assert pack([], 6) == [] and pack([[], []], 6) == []


def test_rows_have_fixed_shape_and_dtype():
    rows = list(pack_documents([np.arange(5, 300)], 16, CLS, SEP, PAD))
    assert all(r.shape == (16,) and r.dtype == np.int32 for r in rows)
    assert len(rows) == int(np.ceil(295 / 14))
    with pytest.raises(ValueError):
        list(pack_documents([[5]], 2, CLS, SEP, PAD))


@pytest.mark.parametrize("seq_len", [8, 13, 64])
def test_every_token_once_in_order_with_boundaries(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = rng.choice([0, 1, 2, 5, seq_len - 3, seq_len - 2, seq_len - 1, 3 * seq_len + 1], size=300)
    docs = [list(rng.integers(5, 1000, size=n)) for n in lengths]
    rows = np.stack(list(pack_documents(docs, seq_len, CLS, SEP, PAD)))

    content, sep_at, row_end_at = [], set(), set()
    for i, row in enumerate(rows):
        assert row[0] == CLS and row[1] != SEP
        n = int(np.count_nonzero(row != PAD))
        assert np.all(row[n:] == PAD)
        assert i == len(rows) - 1 or n == seq_len  # only the last row is padded
        assert row[n - 1] == SEP
        for tok in row[1:n - 1]:
            if tok == SEP:
                sep_at.add(len(content))
            else:
                content.append(int(tok))
        row_end_at.add(len(content))

    nonempty = [d for d in docs if d]
    assert content == [int(t) for d in nonempty for t in d]  # every token once, in order
    boundaries = set(np.cumsum([len(d) for d in nonempty])[:-1].tolist())
    assert sep_at <= boundaries  # a [SEP] inside a row is always a document end ...
    assert boundaries <= sep_at | row_end_at  # ... and every document end is marked
    assert any(len(d) > seq_len for d in nonempty)  # long documents were exercised
