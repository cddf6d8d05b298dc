"""Logical axes on every parameter, the config-overridable rules table, activation constraints."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bert_jax import sharding
from bert_jax.models import BertForMaskedLM, ElectraForPretraining, EncoderConfig, generator_config
from configs import bert as bert_configs

CFG = EncoderConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                    max_position_embeddings=32, embedding_size=16)
BERT_CFG = EncoderConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                         max_position_embeddings=32)


@pytest.mark.parametrize("name", ["bert", "electra"])
def test_every_parameter_has_logical_axes(name):
    model_fn = {"bert": lambda: BertForMaskedLM(BERT_CFG, nnx.Rngs(0)),
                "electra": lambda: ElectraForPretraining(CFG, generator_config(CFG, 0.5), nnx.Rngs(0))}[name]
    with jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        model = nnx.eval_shape(model_fn)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    assert len(leaves) > 10
    for path, var in leaves:
        names = var.get_metadata().get("out_sharding")
        where = jax.tree_util.keystr(path)
        assert isinstance(var, nnx.Param), where
        assert names is not None and len(names) == var.shape.__len__(), (where, names, var.shape)
        assert set(names) - {None} <= set(sharding.LOGICAL_AXES), (where, names)
        assert var.ndim < 2 or any(n is not None for n in names), (where, names)  # matrices are never whole
        if "['layers']" in where:
            assert names[0] == "layers", (where, names)  # stacked layers carry their own axis name


def test_rules_from_the_config_override_the_table():
    config = bert_configs.get_config("tiny")
    assert sharding.rules_from_config(config.mesh.rules) == sharding.DEFAULT_RULES  # the config mirrors the table
    with config.unlocked():
        config.mesh.rules.vocab = ""
        config.mesh.rules.embed = "data,fsdp"
    rules = dict(sharding.rules_from_config(config.mesh.rules))
    assert rules["vocab"] is None and rules["embed"] == ("data", "fsdp") and rules["mlp"] == "tensor"
    mesh = sharding.make_mesh(1, 2, 4)
    _, _, shardings = sharding.abstract_params(lambda: BertForMaskedLM(BERT_CFG, nnx.Rngs(0)), mesh,
                                               tuple(rules.items()))
    word = shardings["encoder"]["embeddings"]["word"].spec
    assert word == P(None, ("data", "fsdp")), word
    with pytest.raises(ValueError, match="mesh.rules.mlp='model'"):
        sharding.rules_from_config({"mlp": "model"})
    with pytest.raises(ValueError, match="unknown logical axes"):
        sharding.rules_from_config({"hidden": "fsdp"})


def test_activations_are_constrained_at_layer_boundaries_only_under_a_mesh():
    mesh = sharding.make_mesh(2, 2, 2)
    x = np.ones((8, 4, 6), np.float32)
    fn = jax.jit(lambda v: sharding.constrain_activations(v * 2))
    out = sharding.in_mesh(fn, mesh)(x)
    assert out.sharding.is_equivalent_to(jax.NamedSharding(mesh, P(("data", "fsdp"))), 3), out.sharding
    np.testing.assert_array_equal(out, 2 * x)
    assert "sharding_constraint" in sharding.in_mesh(jax.jit(sharding.constrain_activations).lower, mesh)(x).as_text()
    assert "sharding_constraint" not in jax.jit(sharding.constrain_activations).lower(x).as_text()  # no mesh: no-op
    odd = sharding.in_mesh(jax.jit(sharding.constrain_activations), mesh)(np.ones((3, 4, 6), np.float32))
    assert odd.shape == (3, 4, 6)  # rows that do not divide the batch axes stay unconstrained
    # The encoder calls it in its scanned layer body.
    graphdef, abstract, shardings = sharding.abstract_params(lambda: BertForMaskedLM(BERT_CFG, nnx.Rngs(0)), mesh)
    ids = np.full((8, 8), 5, np.int32)

    def encode(params, i):
        return nnx.merge(graphdef, params).encoder(i, jax.numpy.ones_like(i), jax.numpy.zeros_like(i))

    lowered = sharding.in_mesh(jax.jit(encode, in_shardings=(shardings, None)).lower, mesh)(abstract, ids)
    constraints = [ln for ln in lowered.as_text().splitlines() if "sharding_constraint" in ln]
    assert any("8x8x32xf32" in ln and "data" in ln and "fsdp" in ln for ln in constraints), constraints
