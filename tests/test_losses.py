"""Losses against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np

from bert_jax import losses


def test_weighted_cross_entropy_hand_computed():
    logits = jnp.asarray([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])
    labels = jnp.asarray([[1, 2]])
    weights = jnp.asarray([[1.0, 1.0]])
    total, denom = losses.weighted_cross_entropy(logits, labels, weights)
    expected = math.log(3) + (math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 3)
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    assert float(denom) == 2.0
    # A zero weight removes a position from both sums.
    total, denom = losses.weighted_cross_entropy(logits, labels, jnp.asarray([[0.0, 1.0]]))
    np.testing.assert_allclose(float(total), expected - math.log(3), rtol=1e-6)
    assert float(denom) == 1.0


def test_weighted_accuracy():
    logits = jnp.asarray([[[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]]])
    correct, denom = losses.weighted_accuracy(logits, jnp.asarray([[1, 1, 1]]), jnp.asarray([[1.0, 1.0, 0.0]]))
    assert (float(correct), float(denom)) == (1.0, 2.0)
