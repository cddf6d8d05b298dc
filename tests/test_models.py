"""Model shapes, parameter counts (against Hugging Face's BertForMaskedLM) and logical axis names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bert_jax import sharding
from bert_jax.models import BertForMaskedLM, EncoderConfig
from configs import common

TINY = EncoderConfig(vocab_size=211, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_position_embeddings=64)


def _abstract(cfg):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    return sharding.abstract_params(lambda: BertForMaskedLM(cfg, nnx.Rngs(0)), mesh)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _closed_form_count(cfg: EncoderConfig) -> int:
    """BertForMaskedLM's parameter count, by hand (equals Hugging Face's)."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    embeddings = (v + cfg.max_position_embeddings + cfg.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    head = (h * h + h) + 2 * h + v
    return embeddings + cfg.num_layers * layer + head


@pytest.mark.parametrize("size", ["tiny", "base", "large"])
def test_param_count_matches_closed_form(size):
    layers, hidden, heads, mlp = common.SIZES[size]
    cfg = EncoderConfig(vocab_size=30522, hidden_size=hidden, num_layers=layers, num_heads=heads,
                        intermediate_size=mlp)
    _, abstract, _ = _abstract(cfg)
    assert _count(abstract) == _closed_form_count(cfg)


def test_base_param_count_equals_hf_bert_for_masked_lm():
    import transformers  # pylint: disable=import-outside-toplevel
    hf_cfg = transformers.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072)
    hf = transformers.BertForMaskedLM(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())  # tied decoder counted once
    cfg = EncoderConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
    _, abstract, _ = _abstract(cfg)
    assert _count(abstract) == hf_count == _closed_form_count(cfg) == 109_514_298


def test_every_parameter_has_logical_axes():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        _, state = nnx.split(nnx.eval_shape(lambda: BertForMaskedLM(TINY, nnx.Rngs(0))))
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        names = var.get_metadata().get("out_sharding") or var.get_metadata().get("sharding_names")
        assert names is not None and len(names) == len(var.shape), (path, names)


def test_output_shapes_and_masked_positions_only():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        model = BertForMaskedLM(TINY, nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 211, (3, 16)), jnp.int32)
    mask = jnp.ones_like(ids).at[2, 10:].set(0)
    types = jnp.zeros_like(ids)
    positions = jnp.asarray([[1, 2], [3, 4], [5, 9]], jnp.int32)
    logits = model(ids, mask, types, positions)
    assert logits.shape == (3, 2, 211)
    hidden = model.encoder(ids, mask, types)
    assert hidden.shape == (3, 16, 32)
    all_logits = model.hidden_and_logits(ids, mask, types)[1]
    np.testing.assert_allclose(np.take_along_axis(np.asarray(all_logits), np.asarray(positions)[..., None], 1),
                               logits, atol=1e-5)
    # Padding keys get no attention: changing tokens under padding does not change the other outputs.
    ids2 = ids.at[2, 12].set(7)
    np.testing.assert_allclose(model.encoder(ids2, mask, types)[2, :10], hidden[2, :10], atol=1e-6)
    # Dropout changes outputs only when a key is given.
    cfg_drop = EncoderConfig(**{**TINY.__dict__, "hidden_dropout": 0.5})
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        m2 = BertForMaskedLM(cfg_drop, nnx.Rngs(0))
    a = m2.encoder(ids, mask, types)
    b = m2.encoder(ids, mask, types, dropout_key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(a, m2.encoder(ids, mask, types), atol=0)
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_layer_kernels_shard_over_fsdp_and_tensor():
    # An even vocabulary: an indivisible one (TINY's 211) is replicated over `tensor` (divisible_spec).
    cfg = EncoderConfig(**{**TINY.__dict__, "vocab_size": 212})
    _, _, shardings = sharding.abstract_params(lambda: BertForMaskedLM(cfg, nnx.Rngs(0)),
                                               sharding.make_mesh(data=2, fsdp=2, tensor=2))
    layers = shardings["encoder"]["layers"]
    assert layers["intermediate"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert layers["attention"]["query"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["encoder"]["embeddings"]["word"].spec == P("tensor", "fsdp")


def _loss_and_grads(model_fn, call):
    """(loss, gradients) of the sum of log-softmax logits `call(model)` picks, deterministic."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        graphdef, params = nnx.split(model_fn())

    def loss(params):
        return jnp.sum(jax.nn.log_softmax(call(nnx.merge(graphdef, params))) * jnp.arange(211) / 211)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("layers,attention,remat,model", [
    (1, "einsum", "none", "bert"), (3, "einsum", "dots", "bert"), (3, "dot_product", "none", "bert"),
    (2, "einsum", "dots", "electra")])
def test_last_layer_at_predictions_gives_the_same_loss_and_gradients(layers, attention, remat, model):
    """model.last_layer=predictions (queries, output projection and MLP of the last layer at the gathered
    positions only) computes the same MLM logits and gradients as the whole last layer then a gather: with
    padding, packed documents (a per-query attention bias), repeated positions and position 0."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    from bert_jax.models import ElectraForPretraining, generator_config  # pylint: disable=import-outside-toplevel
    from bert_jax.models.encoder import document_features  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 211, (3, 16)).astype(np.int32)
    ids[:, 0] = ids[:, 7] = 2  # two packed documents per row ([CLS] = 2)
    ids = jnp.asarray(ids)
    mask = jnp.ones_like(ids).at[2, 12:].set(0)
    types = jnp.zeros_like(ids)
    segment_ids, position_ids = document_features(ids, 2)
    positions = jnp.asarray([[1, 2, 9], [3, 3, 15], [0, 5, 9]], jnp.int32)
    results = {}
    for last_layer in ("all", "predictions"):
        cfg = dataclasses.replace(TINY, num_layers=layers, attention=attention, remat=remat, last_layer=last_layer)
        if model == "bert":
            results[last_layer] = _loss_and_grads(
                lambda: BertForMaskedLM(cfg, nnx.Rngs(0)),  # pylint: disable=cell-var-from-loop
                lambda m: m(ids, mask, types, positions, segment_ids=segment_ids, position_ids=position_ids))
        else:
            gen = generator_config(cfg, 0.5)
            results[last_layer] = _loss_and_grads(
                lambda: ElectraForPretraining(cfg, gen, nnx.Rngs(0)),  # pylint: disable=cell-var-from-loop
                lambda m: m.generator_logits(ids, mask, types, positions, segment_ids=segment_ids,
                                             position_ids=position_ids))
    (loss_all, grads_all), (loss_pred, grads_pred) = results["all"], results["predictions"]
    np.testing.assert_allclose(loss_pred, loss_all, rtol=1e-6)
    leaves = jax.tree_util.tree_flatten_with_path(grads_all)[0]
    assert any(float(jnp.abs(g).max()) > 0 for _, g in leaves)
    for (path, g_all), g_pred in zip(leaves, jax.tree.leaves(grads_pred)):
        np.testing.assert_allclose(g_pred, g_all, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("unroll", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_scan_unroll_computes_the_same(unroll):
    """model.scan_unroll (layers per iteration of the scan; 4 = all of them) changes only how XLA lays out the
    loop: the same hidden states with dropout (each layer keeps its own key), the same loss and gradients
    with the last layer split off (a 3-layer scan: unroll 2 leaves a remainder)."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 211, (3, 16)), jnp.int32)
    mask = jnp.ones_like(ids).at[2, 10:].set(0)
    types = jnp.zeros_like(ids)
    positions = jnp.asarray([[1, 2, 9], [3, 3, 15], [0, 5, 9]], jnp.int32)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    hidden, results = {}, {}
    for u in (1, unroll):
        cfg = dataclasses.replace(TINY, num_layers=4, remat="dots", hidden_dropout=0.3, scan_unroll=u)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
            model = BertForMaskedLM(cfg, nnx.Rngs(0))
        hidden[u] = model.encoder(ids, mask, types, dropout_key=jax.random.PRNGKey(3))
        results[u] = _loss_and_grads(lambda: BertForMaskedLM(cfg, nnx.Rngs(0)),  # pylint: disable=cell-var-from-loop
                                     lambda m: m(ids, mask, types, positions))
    np.testing.assert_allclose(hidden[unroll], hidden[1], rtol=1e-5, atol=1e-6)
    (loss_1, grads_1), (loss_u, grads_u) = results[1], results[unroll]
    np.testing.assert_allclose(loss_u, loss_1, rtol=1e-6)
    for (path, g1), gu in zip(jax.tree_util.tree_flatten_with_path(grads_1)[0], jax.tree.leaves(grads_u)):
        np.testing.assert_allclose(gu, g1, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_bad_scan_unroll_is_refused():
    with pytest.raises(ValueError, match="model.scan_unroll=0 must be >= 1"):
        EncoderConfig(vocab_size=10, scan_unroll=0)
