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
