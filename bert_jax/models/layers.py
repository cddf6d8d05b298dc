"""Building blocks: dense layers with logical axis names, LayerNorm, dropout, attention, one encoder layer.

Every parameter is created through `param()` so that it carries logical axis names from one vocabulary
(batch, length, embed, mlp, heads, kv, vocab, layers); `bert_jax.sharding` maps them onto the mesh.
Dropout takes an explicit PRNG key (None = deterministic) so the step stays a pure function of its inputs.
"""

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bert_jax.kernels import gelu as gelu_kernel, hash_dropout, layernorm as layernorm_kernel
from bert_jax.models.config import EncoderConfig

Initializer = nnx.initializers.Initializer


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str | None]) -> nnx.Param:
    """A float32 parameter initialised by `init` and annotated with logical axis `names`."""
    assert len(shape) == len(names), (shape, names)
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), jnp.float32))


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., K] @ kernel [K, ...] as ONE 2-D matmul: XLA:CPU runs the backward of a 3-D dot_general
    ~2x slower than the same product on [B*S, K] (measured), so leading axes are folded first."""
    k_in = x.shape[-1]
    out_shape = kernel.shape[1:] if kernel.shape[0] == k_in else None
    assert out_shape is not None, (x.shape, kernel.shape)
    y = x.reshape(-1, k_in) @ kernel.reshape(k_in, -1)
    return y.reshape(*x.shape[:-1], *out_shape)


@jax.custom_vjp
def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
    """x [..., N] + bias [N], whose bias gradient is a matrix product (ones [1, rows] @ g [rows, N]) instead
    of a reduction over the rows: XLA:CPU reduced the MLM head's [640, 30522] gradient in ~78 ms per step
    of `small`, the product takes a few."""
    return x + bias


def _add_bias_fwd(x, bias):
    return x + bias, None


def _add_bias_bwd(_, g):
    rows = g.reshape(-1, g.shape[-1])
    return g, (jnp.ones((1, rows.shape[0]), g.dtype) @ rows)[0]


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, S, H], positions [B, P] int -> [B, P, H]."""
    return jnp.take_along_axis(x, positions[..., None], axis=1)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `key` is None (evaluation) or the rate is 0.

    Each element is dropped with probability round(rate * 2^16) / 2^16 (within 2^-17 of `rate`) and the kept
    ones are scaled by the exact inverse keep probability. Two elements share one 32-bit random word: the
    counter-based generator costs the same per word whatever its width, so this halves the random-number
    work, which was ~10% of a mini training step on XLA:CPU (measured: 2.9x faster masks than bernoulli).
    """
    if key is None or rate == 0.0:
        return x
    drop = round(rate * 65536)
    if x.shape[-1] % 2:
        keep = jax.random.bits(key, x.shape, jnp.uint16) >= drop
    else:
        words = jax.random.bits(key, (*x.shape[:-1], x.shape[-1] // 2), jnp.uint32)
        keep = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(x.shape) >= drop
    return jnp.where(keep, x * jnp.asarray(65536 / (65536 - drop), x.dtype), jnp.zeros_like(x))


def dropout_for(cfg: EncoderConfig):
    """The dropout the config asks for: threefry bits (`dropout`) or, with kernels=hash_dropout, hash masks."""
    return hash_dropout.dropout if "hash_dropout" in cfg.kernels else dropout


def gelu(x: jax.Array, hidden_act: str) -> jax.Array:
    """GELU by its config name: "gelu" is the exact (erf) form, "gelu_tanh" the tanh approximation."""
    return jax.nn.gelu(x, approximate=hidden_act == "gelu_tanh")


class Dense(nnx.Module):
    """y = x @ kernel + bias over the last axis; kernel [in, out] with logical names (in_name, out_name)."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], cfg: EncoderConfig, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(cfg.initializer_range)
        self.kernel = param(rngs, init, (d_in, d_out), names)
        self.bias = param(rngs, nnx.initializers.zeros, (d_out,), names[1:])
        self.dtype = cfg.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul(x, self.kernel[...].astype(self.dtype)) + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with the two-pass variance (as PyTorch computes it), statistics in float32."""

    def __init__(self, dim: int, cfg: EncoderConfig, rngs: nnx.Rngs, name: str = "embed"):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (name,))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), (name,))
        self.eps = cfg.layer_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(dtype)


class HeadsDense(nnx.Module):
    """Projection of the hidden state onto heads: [B, S, embed] -> [B, S, heads, kv]."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(cfg.initializer_range)
        shape = (cfg.hidden_size, cfg.num_heads, cfg.head_dim)
        self.kernel = param(rngs, init, shape, ("embed", "heads", "kv"))
        self.bias = param(rngs, nnx.initializers.zeros, shape[1:], ("heads", "kv"))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        return matmul(x, self.kernel[...].astype(dt)) + self.bias[...].astype(dt)


class HeadsOutput(nnx.Module):
    """Merge of the heads back into the hidden state: [B, S, heads, kv] -> [B, S, embed]."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(cfg.initializer_range)
        self.kernel = param(rngs, init, (cfg.num_heads, cfg.head_dim, cfg.hidden_size), ("heads", "kv", "embed"))
        self.bias = param(rngs, nnx.initializers.zeros, (cfg.hidden_size,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        b, s, n, d = x.shape
        kernel = self.kernel[...].astype(dt).reshape(n * d, -1)
        return matmul(x.reshape(b, s, n * d), kernel) + self.bias[...].astype(dt)


class SelfAttention(nnx.Module):
    """Multi-head self-attention; q/k/v kernels are [embed, heads, kv] so heads shard over `tensor`."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.query = HeadsDense(cfg, rngs)
        self.key = HeadsDense(cfg, rngs)
        self.value = HeadsDense(cfg, rngs)
        self.output = HeadsOutput(cfg, rngs)
        self.cfg = cfg
        if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
            raise ValueError(f"model.attention='cudnn' needs a GPU; this backend is {jax.default_backend()!r} "
                             "(choose einsum or dot_product)")

    def __call__(self, x: jax.Array, bias: jax.Array, key: jax.Array | None,
                 positions: jax.Array | None = None, rel: "RelativeInputs | None" = None) -> jax.Array:
        """x [B, S, H], additive bias [B, 1, S, S] or [B, 1, 1, S] -> [B, S, H]. With `positions` [B, P], only
        those rows query (keys and values still come from every position) -> [B, P, H]. `rel` (DeBERTa): the
        relative position embeddings and the indices of those queries (`relative_inputs`)."""
        dt = x.dtype
        x_q = x
        if positions is not None:
            x_q = gather_positions(x, positions)
            if bias.shape[2] > 1:  # per-query bias (segments): keep the chosen queries' rows
                bias = jnp.take_along_axis(bias, positions[:, None, :, None], axis=2)
        key, pos_key = jax.random.split(key) if key is not None and rel is not None else (key, None)
        if self.cfg.attention != "einsum" and (key is None or self.cfg.attention_dropout == 0.0):
            return self._fused(x_q, x, bias, rel, pos_key)

        # Heads-major [B, heads, S, kv] before the two batched matmuls: on XLA:CPU this layout runs the
        # attention forward ~2x and its backward ~1.5x faster than contracting [B, S, heads, kv] in place.
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (self.query(x_q), self.key(x), self.value(x)))
        if rel is not None:
            bias = bias + self._relative_scores(q, k, rel, pos_key)
        q = q * jnp.asarray(self.scale, dt)
        scores = jnp.einsum("bnqd,bnkd->bnqk", q, k).astype(jnp.float32) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        probs = dropout_for(self.cfg)(probs, self.cfg.attention_dropout, key)
        return self.output(jnp.einsum("bnqk,bnkd->bnqd", probs, v).transpose(0, 2, 1, 3))

    @property
    def scale(self) -> float:
        """1/sqrt(head_dim x the number of score terms): 1 for BERT, 3 for DeBERTa's c2p + p2c."""
        return (self.cfg.head_dim * (1 + len(self.cfg.pos_att_types))) ** -0.5

    def _relative_scores(self, q: jax.Array, k: jax.Array, rel: "RelativeInputs", key) -> jax.Array:
        """DeBERTa's disentangled terms, scaled: q [B, N, T, D], k [B, N, S, D] (heads-major) -> [B, N, T, S]
        float32. c2p: each query against the key projection of the relative embedding of its distance to the
        key; p2c: each key against the query projection of the embedding of its distance to the query. Both
        are computed against the embeddings that the row's distances reach (`relative_rows`) and then
        gathered, as Hugging Face does against all 2 x span of them."""
        dt = q.dtype
        lo, hi = relative_rows(self.cfg, k.shape[2])
        emb = dropout_for(self.cfg)(rel.embeddings.astype(dt), self.cfg.hidden_dropout, key)[lo:hi]
        score = jnp.zeros((), jnp.float32)
        if "c2p" in self.cfg.pos_att_types:
            c2p = jnp.einsum("bntd,rnd->bntr", q, self.key(emb))
            score = score + jnp.take_along_axis(c2p, rel.c2p[:, None], axis=-1).astype(jnp.float32)
        if "p2c" in self.cfg.pos_att_types:
            p2c = jnp.einsum("bnsd,rnd->bnsr", k, self.query(emb))
            score = score + jnp.take_along_axis(p2c, rel.p2c[:, None], axis=-1).swapaxes(-1, -2).astype(jnp.float32)
        return score * self.scale

    def _fused(self, x_q: jax.Array, x: jax.Array, bias: jax.Array, rel: "RelativeInputs | None" = None,
               pos_key=None) -> jax.Array:
        """jax.nn.dot_product_attention on [B, S, heads, kv] (no dropout: it has none), written by XLA or, for
        attention='cudnn', by cuDNN's fused kernel (which wants even lengths and a bias row per query).
        DeBERTa's relative terms go in as the kernel's bias, [B, heads, T, S]."""
        q, k, v = self.query(x_q), self.key(x), self.value(x)
        if rel is not None:
            bias = bias + self._relative_scores(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), rel, pos_key)
        bias = bias.astype(x.dtype)
        implementation, num_queries = None, q.shape[1]
        if self.cfg.attention == "cudnn":
            implementation = "cudnn"
            q, k, v, bias = even_lengths(q, k, v, bias)
        ctx = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=self.scale,
                                           implementation=implementation)
        return self.output(ctx[:, :num_queries])


def even_lengths(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array):
    """q [B, T, N, D], k/v [B, S, N, D], bias broadcastable to [B, 1, T, S] -> the same with T and S padded to
    even lengths and the bias broadcast to a row per query, as cuDNN's fused attention wants it: its training
    kernels with a bias refuse odd lengths (e.g. the last layer's queries at 77 prediction slots at seq 512).
    A padded query row is dropped by the caller; a padded key gets the bias -1e9, so no query attends it."""
    T, S = q.shape[1], k.shape[1]
    bias = jnp.broadcast_to(bias, (bias.shape[0], bias.shape[1], T, S))
    pad_t, pad_s = T % 2, S % 2
    if pad_t:
        q = jnp.pad(q, ((0, 0), (0, 1), (0, 0), (0, 0)))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1), (0, 0)))
    if pad_s:
        k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (k, v))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=-1e9)
    return q, k, v, bias


class EncoderLayer(nnx.Module):
    """Post-LayerNorm transformer layer as in BERT: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.attention = SelfAttention(cfg, rngs)
        self.attention_norm = LayerNorm(cfg.hidden_size, cfg, rngs)
        self.intermediate = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), cfg, rngs)
        self.output = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), cfg, rngs)
        self.output_norm = LayerNorm(cfg.hidden_size, cfg, rngs)
        self.cfg = cfg
        pallas = sorted(set(cfg.kernels) & {"layernorm", "gelu"})
        if pallas and jax.default_backend() not in ("gpu", "cpu"):
            raise ValueError(f"model.kernels={'+'.join(pallas)}: Triton kernels run on GPUs (and interpreted on "
                             f"the CPU, for tests); this backend is {jax.default_backend()!r}")

    def __call__(self, x: jax.Array, bias: jax.Array, key: jax.Array | None,
                 positions: jax.Array | None = None, rel: "RelativeInputs | None" = None) -> jax.Array:
        """x [B, S, H] -> [B, S, H]; with `positions` [B, P] the outputs at those positions only, [B, P, H]
        (the same values: only the queries, the output projection and the MLP run on fewer rows). `rel`:
        DeBERTa's relative inputs for these queries."""
        k_attn, k_h1, k_h2 = jax.random.split(key, 3) if key is not None else (None, None, None)
        attn = self.attention(x, bias, k_attn, positions, rel)
        if positions is not None:
            x = gather_positions(x, positions)
        x = self._add_norm(self.attention_norm, attn, x, k_h1)
        if "gelu" in self.cfg.kernels:
            h = gelu_kernel.bias_gelu_dropout(matmul(x, self.intermediate.kernel[...].astype(x.dtype)),
                                              self.intermediate.bias[...],
                                              approximate=self.cfg.hidden_act == "gelu_tanh")
        else:
            h = gelu(self.intermediate(x), self.cfg.hidden_act)
        return self._add_norm(self.output_norm, self.output(h), x, k_h2)

    def _add_norm(self, norm: LayerNorm, x: jax.Array, residual: jax.Array, key: jax.Array | None) -> jax.Array:
        """norm(residual + dropout(x)): one fused kernel with kernels=layernorm, else XLA's fusions."""
        rate = self.cfg.hidden_dropout
        if "layernorm" in self.cfg.kernels:
            return layernorm_kernel.residual_dropout_layernorm(x, residual, norm.scale[...], norm.bias[...], key,
                                                               rate=rate, eps=norm.eps)
        return norm(residual + dropout_for(self.cfg)(x, rate, key))


class RelativeInputs(NamedTuple):
    """What DeBERTa's attention reads besides the hidden states: the shared relative position embeddings
    [2 span, H] (after their LayerNorm), and for each query-key pair the column of the c2p scores
    ([B|1, T, S], a column of [T, 2 span]) and for each key-query pair the column of the p2c scores
    ([B|1, S, T], a column of [S, 2 span])."""

    embeddings: jax.Array
    c2p: jax.Array
    p2c: jax.Array


def log_bucket(distance: np.ndarray, buckets: int, max_position: int) -> np.ndarray:
    """Hugging Face's make_log_bucket_position in numpy, in the same float32 steps: distances within
    buckets/2 stay as they are, longer ones map logarithmically onto the rest, reaching buckets/2 - 1 more at
    max_position - 1 (and beyond it, further, to be clipped by the caller)."""
    distance = np.asarray(distance, np.int64)
    mid = buckets // 2
    abs_pos = np.where((distance < mid) & (distance > -mid), mid - 1, np.abs(distance))
    ratio = np.log(abs_pos.astype(np.float32) / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
    log_pos = np.ceil(ratio * np.float32(mid - 1)) + np.float32(mid)
    return np.where(abs_pos <= mid, distance, log_pos * np.sign(distance)).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _relative_tables(cfg: EncoderConfig, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For each distance query - key in -(seq_len - 1) .. seq_len - 1: its row of the 2 x span relative
    embeddings in the c2p term, and that of the opposite distance (key - query) in the p2c term. Built once
    per (config, length) and read-only: `relative_rows` and `relative_inputs` share them."""
    span = cfg.relative_span
    distance = np.arange(-(seq_len - 1), seq_len)
    bucket = log_bucket(distance, span, cfg.max_relative) if cfg.position_buckets > 0 else distance
    tables = np.clip(bucket + span, 0, 2 * span - 1), np.clip(-bucket + span, 0, 2 * span - 1)
    for table in tables:
        table.setflags(write=False)
    return tables


@functools.lru_cache(maxsize=None)
def relative_rows(cfg: EncoderConfig, seq_len: int) -> tuple[int, int]:
    """[lo, hi): the rows of the 2 x span relative embeddings that the distances within a row of seq_len
    reach. Only these are projected and scored: e.g. 255 of DeBERTa-v3's 512 at seq 128 (distances under
    position_buckets / 2 = 128 are their own buckets), 511 at seq 512. The same scores as projecting all
    rows and gathering, with half the work at seq 128 (the gradients' sums run over fewer rows: a tiny
    DeBERTa run's losses moved in the last bit, 1e-7 relative, over 20 steps)."""
    c2p, p2c = _relative_tables(cfg, seq_len)
    return int(min(c2p.min(), p2c.min())), int(max(c2p.max(), p2c.max())) + 1


def relative_inputs(cfg: EncoderConfig, embeddings: jax.Array, query_index: jax.Array,
                    seq_len: int) -> RelativeInputs:
    """The indices of DeBERTa's relative terms for queries at `query_index` [B|1, T] (their index in the
    row) against the keys 0..seq_len-1, counted from `relative_rows`' first row. The bucket of each distance
    is a numpy table built at trace time (the length is static), so the log is that of `log_bucket` whatever
    the device.

    Distances are index differences: in a packed row they are the distances within each document (the
    attention bias masks every pair across documents), the same as per-document position ids would give."""
    c2p_table, p2c_table = _relative_tables(cfg, seq_len)
    lo, _ = relative_rows(cfg, seq_len)
    c2p_table, p2c_table = (jnp.asarray(t - lo, jnp.int32) for t in (c2p_table, p2c_table))
    dist = query_index[:, :, None] - jnp.arange(seq_len, dtype=jnp.int32)[None, None, :]  # query - key
    return RelativeInputs(embeddings, c2p_table[dist + seq_len - 1],
                          p2c_table[seq_len - 1 - dist.swapaxes(1, 2)])  # key - query
