"""Packed documents are kept apart: a row holding 2-3 documents gives, at each document's tokens, the same
hidden states and logits as each document run alone (BERT and both ELECTRA towers), with segment ids and
positions derived on device from the [CLS] of each packed piece (data_pipeline.packing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bert_jax import losses, masking, objectives, sharding
from bert_jax.models import BertForMaskedLM, ElectraForPretraining, EncoderConfig, generator_config
from bert_jax.models.encoder import document_features
from data_pipeline import packing

VOCAB, PAD, CLS, SEP, MASK = 101, 0, 2, 3, 4
S = 32
BERT = EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_position_embeddings=S)
DISC = EncoderConfig(vocab_size=VOCAB, hidden_size=32, embedding_size=16, num_layers=2, num_heads=4,
                     intermediate_size=64, max_position_embeddings=S)


def _build(fn):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        return fn()


def _rows():
    """[4, S]: row 0 packs three documents (the real packer); rows 1-3 hold each document alone (padded),
    and `starts` where each begins in row 0. One shape for every call keeps compilation to a minimum."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, VOCAB, n).tolist() for n in (9, 6, 8)]
    packed = list(packing.pack_documents(docs, S, CLS, SEP, PAD))
    assert len(packed) == 1 and (packed[0] == PAD).any()
    rows = np.full((4, S), PAD, np.int32)
    rows[0] = packed[0]
    for i, d in enumerate(docs):
        rows[i + 1, :len(d) + 2] = [CLS, *d, SEP]
    starts = np.flatnonzero(rows[0] == CLS).tolist()
    assert len(starts) == 3
    return jnp.asarray(rows), [(start, len(d) + 2) for start, d in zip(starts, docs)]


def _inputs(ids):
    return ids, (ids != PAD).astype(jnp.int32), jnp.zeros_like(ids)


def test_device_features_equal_the_numpy_reference():
    ids = np.random.default_rng(1).choice([CLS, SEP, PAD, 7, 8, 9], size=(4, 40)).astype(np.int32)
    got = jax.device_get(document_features(jnp.asarray(ids), CLS))
    want = packing.document_features(ids, CLS)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def _check(packed_out, alone_out, docs, atol):
    """packed_out / alone_out [4, S, ...]: row 0 at each document's tokens == that document's own row."""
    for i, (start, n) in enumerate(docs):
        np.testing.assert_allclose(packed_out[0, start:start + n], alone_out[i + 1, :n], atol=atol, rtol=1e-5)


@pytest.mark.slow
def test_bert_packed_row_equals_each_document_alone():
    model = _build(lambda: BertForMaskedLM(BERT, nnx.Rngs(0)))
    rows, docs = _rows()
    seg, pos = document_features(rows, CLS)

    @nnx.jit  # one compilation for both calls
    def run(model, rows, seg, pos):
        return (model.hidden_and_logits(*_inputs(rows), segment_ids=seg, position_ids=pos),
                model.hidden_and_logits(*_inputs(rows)))

    (h, logits), (h_plain, logits_plain) = run(model, rows, seg, pos)
    _check(h, h_plain, docs, 2e-5)  # rows 1-3 have one document each: the plain model is "each alone"
    _check(logits, logits_plain, docs, 5e-5)
    start, n = docs[1]  # without the segments the later documents see the others: the test can fail
    assert np.abs(np.asarray(h_plain[0, start:start + n] - h_plain[2, :n])).max() > 1e-3


@pytest.mark.slow
def test_electra_towers_packed_row_equals_each_document_alone():
    model = _build(lambda: ElectraForPretraining(DISC, generator_config(DISC, 0.5), nnx.Rngs(0)))
    rows, docs = _rows()
    everywhere = jnp.tile(jnp.arange(S, dtype=jnp.int32)[None], (4, 1))

    @nnx.jit
    def run(model, rows):
        out = []
        for kw in (dict(zip(("segment_ids", "position_ids"), document_features(rows, CLS))), {}):
            out += [model.discriminator_logits(*_inputs(rows), **kw),
                    model.generator_logits(*_inputs(rows), everywhere, **kw)]
        return out

    disc, gen, disc1, gen1 = run(model, rows)
    _check(disc, disc1, docs, 5e-5)
    _check(gen, gen1, docs, 5e-5)


@pytest.mark.slow
def test_objective_switch_passes_the_documents_to_the_model():
    model = _build(lambda: BertForMaskedLM(BERT, nnx.Rngs(0)))
    rows, _ = _rows()
    batch = dict(zip(("input_ids", "attention_mask", "token_type_ids"), _inputs(rows)))
    spec = masking.MaskingSpec(vocab_size=VOCAB, mask_id=MASK, pad_id=PAD, special_ids=(PAD, 1, CLS, SEP, MASK))
    on, off = objectives.MlmObjective(spec, document_cls_id=CLS), objectives.MlmObjective(spec)
    masked = on.corrupt(jax.random.PRNGKey(0), batch)
    norms = on.normalizers(batch, masked)

    @nnx.jit
    def run(model):
        seg, pos = document_features(batch["input_ids"], CLS)
        logits = model(masked.input_ids, batch["attention_mask"], batch["token_type_ids"], masked.positions,
                       segment_ids=seg, position_ids=pos)
        return (on.loss(model, batch, masked, None, norms)[1], off.loss(model, batch, masked, None, norms)[1],
                losses.weighted_cross_entropy(logits, masked.labels, masked.weights)[0])

    sums_on, sums_off, want = run(model)
    np.testing.assert_allclose(sums_on["mlm_loss"][0], want, rtol=1e-6)
    assert abs(float(sums_on["mlm_loss"][0]) - float(sums_off["mlm_loss"][0])) > 1e-4
