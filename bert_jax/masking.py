"""Masked-language-model corruption on device, with fixed shapes.

Each row gets up to `max_predictions` chosen positions, as BERT's data generator picks them:
n = min(max_predictions, max(1, round(mask_rate * maskable))) among the maskable tokens (not special, not
padding). Of the chosen, `mask_token_rate` become [MASK], `random_token_rate` a random non-special token,
the rest stay as they are. Everything is [batch, max_predictions]-shaped, so the vocab projection runs only
there, and the data pipeline stays unaware of the objective.

Whole-word masking (`MaskingSpec.word_starts` set, from the tokenizer's `word_start_mask()`): words are
chosen instead of single pieces, and every piece of a chosen word is predicted. A word is a word-start token
and the continuation pieces that follow it (a continuation right after a special token starts a word of its
own). The budget is still n tokens (above); words are taken in random order while the total stays within n,
then the slots left are filled with random one-piece words, so a word is never cut at the cap and rows still
reach n almost always. The 80/10/10 decision is drawn once per WORD (all its pieces become [MASK], or all
random tokens, or all stay), so a chosen word is never half visible.

ELECTRA's replacements: `sample_tokens` draws from a generator's softmax (Gumbel-max, never a special
token), and `replace_tokens` writes the draws into the original ids and labels what changed.
"""

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class MaskedBatch:
    """input_ids: [B, S] corrupted ids; positions, labels, weights: [B, P] (weights 1.0 on real predictions)."""

    input_ids: jax.Array
    positions: jax.Array
    labels: jax.Array
    weights: jax.Array


@flax.struct.dataclass
class MaskingSpec:
    """Static settings of the corruption (hashable, closed over by the jitted step)."""

    vocab_size: int = flax.struct.field(pytree_node=False)
    mask_id: int = flax.struct.field(pytree_node=False)
    pad_id: int = flax.struct.field(pytree_node=False)
    special_ids: tuple[int, ...] = flax.struct.field(pytree_node=False)
    mask_rate: float = flax.struct.field(pytree_node=False, default=0.15)
    max_predictions: int = flax.struct.field(pytree_node=False, default=20)
    mask_token_rate: float = flax.struct.field(pytree_node=False, default=0.8)
    random_token_rate: float = flax.struct.field(pytree_node=False, default=0.1)
    # Whole-word masking: a bool [vocab_size] table (True where a token begins a word) as bytes, which keeps
    # the spec hashable; None: token-level masking. Built once by `data_pipeline.tokenization.word_start_table`.
    word_starts: bytes | None = flax.struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if not 0.0 < self.mask_rate <= 1.0:
            raise ValueError(f"objective.mask_rate={self.mask_rate} must be in (0, 1]")
        if self.mask_token_rate < 0 or self.random_token_rate < 0 or (
                self.mask_token_rate + self.random_token_rate > 1.0):
            raise ValueError("objective.mask_token_rate + objective.random_token_rate must lie in [0, 1]")
        if self.max_predictions < 1:
            raise ValueError(f"objective.max_predictions={self.max_predictions} must be >= 1")
        if self.word_starts is not None and len(self.word_starts) != self.vocab_size:
            raise ValueError(f"the word-start table has {len(self.word_starts)} entries for a vocabulary of "
                             f"{self.vocab_size}")


def maskable(input_ids: jax.Array, spec: MaskingSpec) -> jax.Array:
    """[B, S] bool: positions that may be chosen (not padding, not any special token)."""
    special = np.asarray(sorted(set(spec.special_ids) | {spec.pad_id}), np.int32)
    return ~jnp.isin(input_ids, special)


def _budget(can: jax.Array, spec: MaskingSpec, num_slots: int) -> jax.Array:
    """[B] int32: tokens to choose per row, min(slots, max(1, round(rate * maskable))), 0 if none maskable."""
    num_can = can.sum(axis=1)
    num_pick = jnp.minimum(num_slots, jnp.maximum(1, jnp.round(num_can * spec.mask_rate))).astype(jnp.int32)
    return jnp.where(num_can > 0, jnp.minimum(num_pick, num_can), 0)


def mask_tokens(rng: jax.Array, input_ids: jax.Array, spec: MaskingSpec) -> MaskedBatch:
    """input_ids [B, S] -> MaskedBatch with P = min(max_predictions, S) prediction slots per row.
    Whole words when `spec.word_starts` is set (see the module docstring), else single tokens."""
    if spec.word_starts is not None:
        return mask_whole_words(rng, input_ids, spec)
    num_slots = min(spec.max_predictions, input_ids.shape[1])
    k_choose, k_action, k_random = jax.random.split(rng, 3)
    can = maskable(input_ids, spec)
    num_pick = _budget(can, spec, num_slots)
    # A uniformly random subset of the maskable positions: the top-k of random scores (-1 where not allowed).
    scores = jnp.where(can, jax.random.uniform(k_choose, can.shape), -1.0)
    _, positions = jax.lax.top_k(scores, num_slots)
    weights = (jnp.arange(num_slots)[None, :] < num_pick[:, None])
    positions = jnp.where(weights, positions, 0).astype(jnp.int32)
    u = jax.random.uniform(k_action, positions.shape)
    return _corrupt(input_ids, positions, weights, u, k_random, spec)


def mask_whole_words(rng: jax.Array, input_ids: jax.Array, spec: MaskingSpec) -> MaskedBatch:
    """Whole-word masking: input_ids [B, S] -> MaskedBatch ([B, P] slots, positions in increasing order)."""
    b, s = input_ids.shape
    num_slots = min(spec.max_predictions, s)
    k_choose, k_action, k_random = jax.random.split(rng, 3)
    rows = jnp.arange(b)[:, None]
    can = maskable(input_ids, spec)
    num_pick = _budget(can, spec, num_slots)
    table = jnp.asarray(np.frombuffer(spec.word_starts, dtype=bool))
    after_can = jnp.pad(can[:, :-1], ((0, 0), (1, 0)))
    starts = can & (table[input_ids] | ~after_can)
    word = jnp.maximum(jnp.cumsum(starts, axis=1) - 1, 0)  # [B, S] index of each token's word
    lengths = jnp.zeros((b, s), jnp.int32).at[rows, word].add(can.astype(jnp.int32))  # [B, words]
    real = jnp.arange(s)[None, :] < starts.sum(axis=1, keepdims=True)  # word indices that exist

    # Words in random order; take the longest prefix within the budget, then fill with one-piece words.
    scores = jnp.where(real, jax.random.uniform(k_choose, (b, s)), -1.0)
    _, order = jax.lax.top_k(scores, s)
    sorted_len = jnp.where(jnp.take_along_axis(real, order, axis=1), jnp.take_along_axis(lengths, order, axis=1), 0)
    first = (sorted_len > 0) & (jnp.cumsum(sorted_len, axis=1) <= num_pick[:, None])
    left = num_pick - jnp.where(first, sorted_len, 0).sum(axis=1)
    single = (sorted_len == 1) & ~first
    fill = single & (jnp.cumsum(single, axis=1) <= left[:, None])
    chosen_word = jnp.zeros((b, s), bool).at[rows, order].set(first | fill)
    chosen = can & jnp.take_along_axis(chosen_word, word, axis=1)  # [B, S] every piece of a chosen word

    # Chosen positions in increasing order (at most num_pick <= num_slots of them).
    _, positions = jax.lax.top_k(jnp.where(chosen, s - jnp.arange(s)[None, :], 0), num_slots)
    weights = jnp.arange(num_slots)[None, :] < chosen.sum(axis=1, keepdims=True)
    positions = jnp.where(weights, positions, 0).astype(jnp.int32)
    # One 80/10/10 draw per word, shared by its pieces.
    u_word = jax.random.uniform(k_action, (b, s))
    u = jnp.take_along_axis(u_word, jnp.take_along_axis(word, positions, axis=1), axis=1)
    return _corrupt(input_ids, positions, weights, u, k_random, spec)


def _corrupt(input_ids, positions, weights, u, k_random, spec: MaskingSpec) -> MaskedBatch:
    """Applies the 80/10/10 decision `u` [B, P] at the chosen `positions` (where `weights`)."""
    labels = jnp.take_along_axis(input_ids, positions, axis=1)
    # 80 / 10 / 10: [MASK], a random non-special token, unchanged.
    non_special = np.setdiff1d(np.arange(spec.vocab_size), np.asarray(spec.special_ids + (spec.pad_id,)))
    random_ids = jnp.asarray(non_special, jnp.int32)[
        jax.random.randint(k_random, positions.shape, 0, len(non_special))]
    new = jnp.where(u < spec.mask_token_rate, spec.mask_id,
                    jnp.where(u < spec.mask_token_rate + spec.random_token_rate, random_ids, labels))
    new = jnp.where(weights, new, labels)
    rows = jnp.arange(input_ids.shape[0])[:, None]
    # Unused slots write out of bounds and are dropped (their position 0 is only read, with weight 0).
    write_at = jnp.where(weights, positions, input_ids.shape[1])
    corrupted = input_ids.at[rows, write_at].set(new.astype(input_ids.dtype), mode="drop")
    return MaskedBatch(input_ids=corrupted, positions=positions, labels=labels.astype(jnp.int32),
                       weights=weights.astype(jnp.float32))


def sample_tokens(keys: jax.Array, logits: jax.Array, spec: MaskingSpec, temperature: float = 1.0) -> jax.Array:
    """keys [B, 2] uint32 (one per row), logits [B, P, V] -> sampled ids [B, P] int32 from softmax(logits / T).

    Gumbel-max: argmax(logits / T + Gumbel noise) is a draw from that softmax. The noise comes from one key
    per row, so a row draws the same tokens whether it is in a micro-batch or the whole batch. Special tokens
    and padding get -inf logits and are never drawn. No gradient flows through the draw."""
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32) / temperature
    special = np.asarray(sorted(set(spec.special_ids) | {spec.pad_id, spec.mask_id}), np.int32)
    logits = logits.at[..., special].set(-jnp.inf)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], jnp.float32))(keys)
    return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)


def replace_tokens(input_ids: jax.Array, positions: jax.Array, weights: jax.Array, sampled: jax.Array):
    """Original input_ids [B, S], positions / weights / sampled [B, P] -> (ids [B, S] with the sampled tokens
    written at the real positions, labels [B, S] float32: 1.0 where the id now differs from the original).

    A sampled token equal to the original counts as original (label 0), as in the ELECTRA paper."""
    rows = jnp.arange(input_ids.shape[0])[:, None]
    write_at = jnp.where(weights > 0, positions, input_ids.shape[1])  # unused slots fall out of bounds
    replaced = input_ids.at[rows, write_at].set(sampled.astype(input_ids.dtype), mode="drop")
    return replaced, (replaced != input_ids).astype(jnp.float32)


def special_ids_tuple(ids: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({int(i) for i in ids}))
