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


def test_cross_entropy_and_bias_gradients_equal_autodiff_of_the_plain_formulas():
    """softmax_cross_entropy's written-out gradient and add_bias's matmul-reduced bias gradient equal what
    autodiff gives for logsumexp - gather and for x + b (the forms they replace for speed)."""
    import jax  # pylint: disable=import-outside-toplevel
    from bert_jax.models.layers import add_bias  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 37)).astype(np.float32)) * 3
    bias = jnp.asarray(rng.normal(size=(37,)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 37, (2, 5)).astype(np.int32))
    g = jnp.asarray(rng.normal(size=(2, 5)).astype(np.float32))

    def ours(x, bias):
        return (losses.softmax_cross_entropy(add_bias(x, bias), labels) * g).sum()

    def plain(x, bias):
        logits = x + bias
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
        return (nll * g).sum()

    np.testing.assert_allclose(ours(x, bias), plain(x, bias), rtol=1e-6)
    for a, b in zip(jax.grad(ours, (0, 1))(x, bias), jax.grad(plain, (0, 1))(x, bias)):
        assert float(jnp.abs(b).max()) > 0.1
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_weighted_accuracy_is_argmax_and_counts_ties_as_misses():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 6, 50)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 50, (4, 6)).astype(np.int32)).at[0, :3].set(jnp.argmax(logits[0, :3], -1))
    weights = jnp.ones((4, 6))
    correct, _ = losses.weighted_accuracy(logits, labels, weights)
    assert float(correct) == float((jnp.argmax(logits, -1) == labels).sum()) >= 3
    tied = jnp.zeros((1, 1, 4))  # every class ties: no class is the prediction
    assert float(losses.weighted_accuracy(tied, jnp.asarray([[0]]), jnp.ones((1, 1)))[0]) == 0.0
