"""Losses as (sum, denominator) pairs, so that gradient accumulation and multi-host averages are exact."""

import jax
import jax.numpy as jnp


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array):
    """logits [..., V], labels [...] int, weights [...] -> (sum of weighted NLL, sum of weights)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return ((log_z - label_logit) * weights).sum(), weights.sum()


def weighted_accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array):
    """-> (weighted count of argmax == label, sum of weights)."""
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return (correct * weights).sum(), weights.sum()


def weighted_sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array):
    """Binary logits [...], labels [...] in {0, 1}, weights [...] -> (sum of weighted NLL, sum of weights).

    -log sigmoid(x) for label 1 and -log(1 - sigmoid(x)) for 0, in the stable form max(x, 0) - x*y +
    log(1 + exp(-|x|))."""
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    nll = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return (nll * weights).sum(), weights.sum()
