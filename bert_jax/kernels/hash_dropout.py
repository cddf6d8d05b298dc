"""Dropout masks from a counter-based hash of (seed, element index), the same bits in XLA and in the kernels.

The training step's dropout key (already a function of the run's seed, the step and the layer) gives two
32-bit seed words; element i of a tensor is kept when its hash's top 24 bits are >= round(rate * 2^24).
Nothing is materialised: a kernel (or an XLA fusion) computes a mask element from its index with a few integer
multiplies and shifts, where threefry costs 20 rounds per word and a pass over memory for the bits (~9 of an
83 ms BERT-base step on an H100, docs/BENCHMARKS.md). The index is the element's position in the GLOBAL
tensor (row-major), so a sharded run draws the same mask as an unsharded one.

The mixer is a 32-bit xor-shift-multiply finaliser applied twice, the seed words entering before each round;
`tests/test_kernels.py` checks the keep rate, neighbour and cross-seed independence statistically.
"""

import jax
import jax.numpy as jnp

KEEP_BITS = 24  # the mask compares a 24-bit draw: the rate is quantised to 2^-24


def _mix(h: jax.Array) -> jax.Array:
    """A bijective 32-bit finaliser (uint32 -> uint32) with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def draws(index: jax.Array, seed0: jax.Array, seed1: jax.Array) -> jax.Array:
    """uint32 element indices and seed words -> int32 draws uniform in [0, 2^24)."""
    h = _mix(_mix(index ^ seed0) + seed1)
    return (h >> (32 - KEEP_BITS)).astype(jnp.int32)


def threshold(rate: float) -> int:
    """Draws below this are dropped: the drop probability is threshold / 2^24 (within 2^-25 of `rate`)."""
    return round(rate * (1 << KEEP_BITS))


def keep_scale(rate: float) -> float:
    """The factor of the kept elements: the exact inverse of the keep probability."""
    return (1 << KEEP_BITS) / ((1 << KEEP_BITS) - threshold(rate))


def seeds(key: jax.Array) -> jax.Array:
    """A dropout key -> its two seed words, uint32 [2] (one tiny threefry call per dropout site)."""
    return jax.random.bits(key, (2,), jnp.uint32)


def keep_mask(seed: jax.Array, shape: tuple[int, ...], rate: float, base: jax.Array | int = 0) -> jax.Array:
    """bool [shape]: which elements survive, for a tensor whose element (i0, i1, ...) has the row-major index
    base + i0 * stride0 + ...; `seed` uint32 [2] from `seeds`."""
    index, stride = jnp.asarray(base, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return draws(index, seed[0], seed[1]) >= threshold(rate)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with hash masks, written in jax.numpy (XLA fuses the hash into its consumer); identity
    for key None (evaluation) or rate 0. The kernels draw exactly these masks."""
    if key is None or rate == 0.0:
        return x
    keep = keep_mask(seeds(key), x.shape, rate)
    return jnp.where(keep, x * jnp.asarray(keep_scale(rate), x.dtype), jnp.zeros_like(x))
