"""Masking statistics: rates, the 80/10/10 split, the cap, and that specials and padding are never chosen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import masking

SPECIALS = (0, 1, 2, 3, 4)
SPEC = masking.MaskingSpec(vocab_size=500, mask_id=4, pad_id=0, special_ids=SPECIALS, mask_rate=0.15,
                           max_predictions=40)


def _rows(n=512, s=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 500, (n, s)).astype(np.int32)
    ids[:, 0] = 2
    lengths = rng.integers(20, s + 1, n)
    for i, length in enumerate(lengths):
        ids[i, length - 1] = 3
        ids[i, length:] = 0
        ids[i, rng.integers(1, length - 1)] = 3  # a document boundary inside the row
    return jnp.asarray(ids), lengths


def test_choice_rate_cap_and_never_special():
    ids, lengths = _rows()
    out = jax.jit(masking.mask_tokens, static_argnums=2)(jax.random.PRNGKey(0), ids, SPEC)
    ids_np, pos, w = np.asarray(ids), np.asarray(out.positions), np.asarray(out.weights)
    maskable = ~np.isin(ids_np, SPECIALS)
    n_maskable = maskable.sum(1)
    expected = np.minimum(40, np.maximum(1, np.round(n_maskable * 0.15)))
    np.testing.assert_array_equal(w.sum(1), expected)
    for i in range(len(ids_np)):
        chosen = pos[i][w[i] > 0]
        assert len(set(chosen.tolist())) == len(chosen)  # distinct positions
        assert maskable[i, chosen].all()  # never [CLS], [SEP], [PAD] or another special
    np.testing.assert_array_equal(np.take_along_axis(ids_np, pos, 1), np.asarray(out.labels))
    # Outside the chosen positions nothing changes.
    changed = np.asarray(out.input_ids) != ids_np
    chosen_mask = np.zeros_like(changed)
    for i in range(len(ids_np)):
        chosen_mask[i, pos[i][w[i] > 0]] = True
    assert not (changed & ~chosen_mask).any()


def test_cap_binds_on_long_rows():
    ids, _ = _rows()
    spec = masking.MaskingSpec(vocab_size=500, mask_id=4, pad_id=0, special_ids=SPECIALS, mask_rate=0.5,
                               max_predictions=10)
    out = masking.mask_tokens(jax.random.PRNGKey(1), ids, spec)
    assert out.positions.shape == (512, 10)
    assert float(out.weights.sum(1).max()) == 10


def test_80_10_10_proportions():
    ids, _ = _rows(n=2048)
    out = masking.mask_tokens(jax.random.PRNGKey(2), ids, SPEC)
    w = np.asarray(out.weights) > 0
    new = np.take_along_axis(np.asarray(out.input_ids), np.asarray(out.positions), 1)[w]
    orig = np.asarray(out.labels)[w]
    n = len(new)
    frac_mask = np.mean(new == 4)
    frac_same = np.mean(new == orig)
    frac_random = 1 - frac_mask - frac_same
    # 3-sigma binomial bounds; a random replacement equals the original 1/495 of the time.
    for frac, p in ((frac_mask, 0.8), (frac_random, 0.1 * (1 - 1 / 495)), (frac_same, 0.1 + 0.1 / 495)):
        assert abs(frac - p) < 3 * np.sqrt(p * (1 - p) / n) + 1e-3, (frac, p, n)
    random_ids = new[(new != 4) & (new != orig)]
    assert not np.isin(random_ids, SPECIALS).any()
    assert len(np.unique(random_ids)) > 300  # spread over the vocabulary


def test_every_maskable_position_is_equally_likely():
    ids = jnp.asarray(np.tile(np.r_[2, np.arange(5, 35), 3, 0, 0].astype(np.int32), (4000, 1)))
    out = masking.mask_tokens(jax.random.PRNGKey(3), ids, SPEC)
    counts = np.bincount(np.asarray(out.positions)[np.asarray(out.weights) > 0], minlength=34)
    assert counts[[0, 31, 32, 33]].sum() == 0
    inner = counts[1:31]
    expected = 4000 * 4 / 30  # 4 = round(0.15 * 30) picks per row
    assert np.all(np.abs(inner - expected) < 5 * np.sqrt(expected))


def test_fresh_masks_per_key_and_deterministic_per_key():
    ids, _ = _rows(n=8)
    a = masking.mask_tokens(jax.random.PRNGKey(5), ids, SPEC)
    b = masking.mask_tokens(jax.random.PRNGKey(5), ids, SPEC)
    c = masking.mask_tokens(jax.random.PRNGKey(6), ids, SPEC)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.array_equal(a.positions, c.positions)


def test_bad_rates_are_refused():
    with pytest.raises(ValueError, match="mask_rate"):
        masking.MaskingSpec(vocab_size=10, mask_id=4, pad_id=0, special_ids=SPECIALS, mask_rate=0.0)


# Whole-word masking: ids 5..299 begin a word, 300..499 continue one ("##" pieces).
WORD_STARTS = np.arange(500) < 300
WWM = masking.MaskingSpec(vocab_size=500, mask_id=4, pad_id=0, special_ids=SPECIALS, mask_rate=0.15,
                          max_predictions=128, word_starts=WORD_STARTS.tobytes())


def _words(row):
    """Reference segmentation of one row: lists of positions, one per word."""
    words, prev_maskable = [], False
    for i, t in enumerate(row):
        if t in SPECIALS:
            prev_maskable = False
            continue
        if WORD_STARTS[t] or not prev_maskable:
            words.append([])
        words[-1].append(i)
        prev_maskable = True
    return words


def _check_whole_words(ids, out):
    ids_np, pos, w = np.asarray(ids), np.asarray(out.positions), np.asarray(out.weights) > 0
    corrupted = np.asarray(out.input_ids)
    np.testing.assert_array_equal(np.take_along_axis(ids_np, pos, 1), np.asarray(out.labels))
    counts = []
    for i, row in enumerate(ids_np):
        chosen = set(pos[i][w[i]].tolist())
        assert len(chosen) == int(w[i].sum())  # distinct
        assert not any(row[p] in SPECIALS for p in chosen)  # specials and padding never
        n_words = 0
        for word in _words(row):
            picked = [p in chosen for p in word]
            assert all(picked) or not any(picked), (i, word)  # a word is chosen whole or not at all
            if all(picked):
                n_words += 1
                is_mask = [corrupted[i, p] == 4 for p in word]
                assert all(is_mask) or not any(is_mask)  # one 80/10/10 decision per word
        assert not (corrupted[i] != row)[[p for p in range(len(row)) if p not in chosen]].any()
        counts.append((len(chosen), n_words))
    return np.array(counts)


def test_whole_word_masking_rate_and_whole_words():
    ids, _ = _rows(n=256)
    out = jax.jit(masking.mask_tokens, static_argnums=2)(jax.random.PRNGKey(5), ids, WWM)
    counts = _check_whole_words(ids, out)
    n_maskable = (~np.isin(np.asarray(ids), SPECIALS)).sum(1)
    budget = np.minimum(128, np.maximum(1, np.round(n_maskable * 0.15)))
    assert (counts[:, 0] <= budget).all()
    assert (counts[:, 0] == budget).mean() > 0.95  # the one-piece fill reaches the budget almost always
    assert abs(counts[:, 0].sum() / n_maskable.sum() - 0.15) < 0.005
    assert counts[:, 0].sum() > 1.2 * counts[:, 1].sum()  # multi-piece words were chosen, not only singles
    # The [MASK] share is 80% of the chosen words.
    u = np.asarray(out.input_ids)[np.arange(256)[:, None], np.asarray(out.positions)] == 4
    assert 0.75 < u[np.asarray(out.weights) > 0].mean() < 0.85


def test_whole_word_masking_respects_the_cap_without_cutting_words():
    ids, _ = _rows(n=128, seed=3)
    spec = masking.MaskingSpec(vocab_size=500, mask_id=4, pad_id=0, special_ids=SPECIALS, mask_rate=0.5,
                               max_predictions=10, word_starts=WORD_STARTS.tobytes())
    out = jax.jit(masking.mask_tokens, static_argnums=2)(jax.random.PRNGKey(6), ids, spec)
    assert out.positions.shape == (128, 10)
    counts = _check_whole_words(ids, out)
    assert counts[:, 0].max() == 10 and (counts[:, 0] >= 8).all()
    with pytest.raises(ValueError, match="word-start table"):
        masking.MaskingSpec(vocab_size=400, mask_id=4, pad_id=0, special_ids=SPECIALS,
                            word_starts=WORD_STARTS.tobytes())
