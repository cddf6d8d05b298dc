"""Optimizer: the weight-decay mask, the schedules, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bert_jax import optim


def test_decay_mask_skips_biases_and_layernorm():
    params = {"encoder": {"embeddings": {"word": 1, "norm": {"scale": 1, "bias": 1}},
                          "layers": {"intermediate": {"kernel": 1, "bias": 1},
                                     "attention_norm": {"scale": 1, "bias": 1},
                                     "attention": {"query": {"kernel": 1, "bias": 1},
                                                   "output": {"kernel": 1, "bias": 1}}}},
              "mlm_head": {"bias": 1, "transform": {"kernel": 1, "bias": 1}, "norm": {"scale": 1, "bias": 1}}}
    mask = optim.decay_mask(params)
    decayed = {"/".join(str(getattr(k, "key", k)) for k in p)
               for p, v in jax.tree_util.tree_flatten_with_path(mask)[0] if v}
    assert decayed == {"encoder/embeddings/word", "encoder/layers/intermediate/kernel",
                       "encoder/layers/attention/query/kernel", "encoder/layers/attention/output/kernel",
                       "mlm_head/transform/kernel"}


def test_weight_decay_applies_only_where_masked():
    c = optim.OptimConfig(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5, clip_norm=0,
                          schedule="constant")
    tx = optim.make_optimizer(c)
    params = {"dense": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones(2), rtol=1e-6)
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_warmup_then_decay(schedule):
    c = optim.OptimConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, schedule=schedule,
                          end_lr_ratio=0.1)
    lr = optim.learning_rate_schedule(c)
    np.testing.assert_allclose([float(lr(0)), float(lr(5)), float(lr(10))], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(float(lr(110)), 0.1, atol=1e-6)
    mid = float(lr(60))
    np.testing.assert_allclose(mid, 0.55, atol=1e-6)  # both pass through the midpoint
    if schedule == "cosine":
        assert float(lr(35)) > 1.0 - 0.9 * 0.25  # cosine stays above linear early in the decay


def test_clipping_bounds_the_update_norm():
    c = optim.OptimConfig(name="adamw", learning_rate=1.0, total_steps=10, clip_norm=1.0, weight_decay=0.0,
                          schedule="constant")
    tx = optim.make_optimizer(c)
    params = {"w": jnp.zeros((4,))}
    _, state = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
    # Adam's first moment after one step is (1 - b1) * the gradient it saw: the clipped one, of norm 1.
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(float(jnp.linalg.norm(mu["w"])), 0.1, rtol=1e-5)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.OptimConfig(schedule="triangle")
    with pytest.raises(ValueError, match="optim.name"):
        optim.OptimConfig(name="sgdx")
