"""LayerNorm(residual + dropout(x)) in one pass forward and one pass backward (Pallas, with a custom VJP).

The post-LN BERT layer ends twice in `LN(residual + dropout(sublayer output))`. XLA runs that as separate
fusions (the dropout bits, the masked add, the row statistics, the normalisation; more in the backward), each
a pass over [tokens, hidden]. Here the forward reads x and residual once and writes y and the sum z that the
backward needs (plus two floats per row); the backward reads dy and z and writes the gradients of residual and
x, with the dropout mask recomputed from its hash (bert_jax/kernels/hash_dropout.py) instead of stored.
The reference, `reference`, is the same computation in jax.numpy; tests/test_kernels.py holds them equal.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bert_jax.kernels import common, hash_dropout as hd


def residual_dropout_layernorm(x, residual, scale, bias, key, *, rate: float, eps: float,
                               rows_per_block: int | None = None):
    """LN(residual + dropout(x, rate, key)) * scale + bias over the last axis. x, residual [..., H] in the
    compute dtype, scale/bias [H] float32; key None (or rate 0): no dropout. Returns x's shape and dtype."""
    rate = rate if key is not None else 0.0
    seed = hd.seeds(key) if rate else jnp.zeros((2,), jnp.uint32)
    shape, h = x.shape, x.shape[-1]
    y = _fused(x.reshape(-1, h), residual.reshape(-1, h).astype(x.dtype), scale, bias, seed,
               rate, eps, rows_per_block)
    return y.reshape(shape)


def reference(x, residual, scale, bias, key, *, rate: float, eps: float):
    """The same in jax.numpy, as bert_jax.models.layers computes it with hash dropout."""
    z = residual + hd.dropout(x, rate, key)
    zf = z.astype(jnp.float32)
    mean = zf.mean(-1, keepdims=True)
    var = jnp.square(zf - mean).mean(-1, keepdims=True)
    return ((zf - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(x, residual, scale, bias, seed, rate, eps, rows_per_block):
    return _forward(x, residual, scale, bias, seed, rate, eps, rows_per_block)[0]


def _fused_fwd(x, residual, scale, bias, seed, rate, eps, rows_per_block):
    y, z, mean, rstd = _forward(x, residual, scale, bias, seed, rate, eps, rows_per_block)
    return y, (z, mean, rstd, scale, seed)


def _fused_bwd(rate, eps, rows_per_block, saved, dy):
    z, mean, rstd, scale, seed = saved
    d_res, d_x, d_scale, d_bias = _backward(dy, z, mean, rstd, scale, seed, rate, rows_per_block)
    h = z.shape[1]
    return (d_x, d_res, d_scale.sum(0)[:h], d_bias.sum(0)[:h], common.zero_cotangent(seed))


_fused.defvjp(_fused_fwd, _fused_bwd)


def _forward(x, residual, scale, bias, seed, rate, eps, rows_per_block):
    n, h = x.shape
    br = rows_per_block or common.block_rows(h, n)

    def run(x, residual, scale, bias, seed, base):
        rows = x.shape[0]
        bw, grid = common.block_width(h), pl.cdiv(rows, br)
        tile = pl.BlockSpec((br, bw), lambda g: (g, 0))
        vec = pl.BlockSpec((bw,), lambda g: (0,))
        row_vec = pl.BlockSpec((br,), lambda g: (g,))
        kernel = functools.partial(_forward_kernel, n_rows=rows, width=h, rate=rate, eps=eps, br=br)
        return common.call(
            kernel, grid=grid, in_specs=[tile, tile, vec, vec, common.seed_spec(h)],
            out_specs=[tile, tile, row_vec, row_vec],
            out_shape=[jax.ShapeDtypeStruct((rows, h), x.dtype), jax.ShapeDtypeStruct((rows, h), x.dtype),
                       jax.ShapeDtypeStruct((rows,), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.float32)],
            name="residual_dropout_layernorm_fwd",
        )(x, residual, scale, bias, common.seed_block(seed, base, h))

    return common.on_row_shards(run, (x, residual), (scale, bias, seed), width=h)


def _forward_kernel(x_ref, res_ref, scale_ref, bias_ref, seed_ref, y_ref, z_ref, mean_ref, rstd_ref, *,
                    n_rows, width, rate, eps, br):
    rows, cols, mask = common.tile_indices(pl.program_id(0), n_rows, width, br)
    x = plgpu.load(x_ref, mask=mask, other=0.0).astype(jnp.float32)
    z = plgpu.load(res_ref, mask=mask, other=0.0).astype(jnp.float32)
    if rate:
        keep = _keep(seed_ref, rows, cols, width, rate)
        x = jnp.where(keep, x * hd.keep_scale(rate), 0.0)
    z = (z + x).astype(z_ref.dtype)  # rounded to the compute dtype, as the unfused layer's sum is
    plgpu.store(z_ref, z, mask=mask)
    z = jnp.where(mask, z.astype(jnp.float32), 0.0)
    mean = z.sum(axis=1) / width
    centred = jnp.where(mask, z - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt((centred * centred).sum(axis=1) / width + eps)
    cmask = cols < width
    scale = plgpu.load(scale_ref, mask=cmask, other=0.0)
    bias = plgpu.load(bias_ref, mask=cmask, other=0.0)
    y = centred * rstd[:, None] * scale[None, :] + bias[None, :]
    plgpu.store(y_ref, y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref, mean, mask=rows < n_rows)
    plgpu.store(rstd_ref, rstd, mask=rows < n_rows)


def _keep(seed_ref, rows, cols, width, rate):
    index = common.element_index(seed_ref, rows, cols, width)
    return hd.draws(index, common.seed_row(seed_ref, 0), common.seed_row(seed_ref, 1)) >= hd.threshold(rate)


def _backward(dy, z, mean, rstd, scale, seed, rate, rows_per_block):
    n, h = z.shape
    br = rows_per_block or common.block_rows(h, n)

    def run(dy, z, mean, rstd, scale, seed, base):
        rows = z.shape[0]
        bw, grid = common.block_width(h), pl.cdiv(rows, br)
        tile = pl.BlockSpec((br, bw), lambda g: (g, 0))
        vec = pl.BlockSpec((bw,), lambda g: (0,))
        row_vec = pl.BlockSpec((br,), lambda g: (g,))
        partial = pl.BlockSpec((None, bw), lambda g: (g, 0))
        kernel = functools.partial(_backward_kernel, n_rows=rows, width=h, rate=rate, br=br)
        outs = [jax.ShapeDtypeStruct((rows, h), z.dtype)] * (2 if rate else 1)
        outs += [jax.ShapeDtypeStruct((grid, bw), jnp.float32)] * 2
        result = common.call(
            kernel, grid=grid, in_specs=[tile, tile, row_vec, row_vec, vec, common.seed_spec(h)],
            out_specs=[tile] * (2 if rate else 1) + [partial, partial], out_shape=outs,
            name="residual_dropout_layernorm_bwd",
        )(dy, z, mean, rstd, scale, common.seed_block(seed, base, h))
        return result if rate else (result[0], result[0], *result[1:])

    return common.on_row_shards(run, (dy, z, mean, rstd), (scale, seed), width=h)


def _backward_kernel(dy_ref, z_ref, mean_ref, rstd_ref, scale_ref, seed_ref, *out_refs, n_rows, width, rate, br):
    d_res_ref, *rest = out_refs
    d_x_ref, d_scale_ref, d_bias_ref = rest if rate else (None, *rest)
    rows, cols, mask = common.tile_indices(pl.program_id(0), n_rows, width, br)
    rmask = rows < n_rows
    dy = plgpu.load(dy_ref, mask=mask, other=0.0).astype(jnp.float32)
    z = plgpu.load(z_ref, mask=mask, other=0.0).astype(jnp.float32)
    mean = plgpu.load(mean_ref, mask=rmask, other=0.0)
    rstd = plgpu.load(rstd_ref, mask=rmask, other=0.0)
    scale = plgpu.load(scale_ref, mask=cols < width, other=0.0)
    xhat = jnp.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * scale[None, :]
    c_xhat = (g * xhat).sum(axis=1) / width
    c_mean = g.sum(axis=1) / width
    dz = jnp.where(mask, (g - c_mean[:, None] - xhat * c_xhat[:, None]) * rstd[:, None], 0.0)
    plgpu.store(d_res_ref, dz.astype(d_res_ref.dtype), mask=mask)
    if rate:
        keep = _keep(seed_ref, rows, cols, width, rate)
        plgpu.store(d_x_ref, jnp.where(keep, dz * hd.keep_scale(rate), 0.0).astype(d_x_ref.dtype), mask=mask)
    d_scale_ref[...] = (dy * xhat).sum(axis=0)
    d_bias_ref[...] = dy.sum(axis=0)
