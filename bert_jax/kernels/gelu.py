"""dropout(GELU(h + bias)) on the MLP's first matmul output, forward and backward one pass each (Pallas).

The forward reads the matmul's output h once and writes the activation; the backward reads dy and h and
writes dh, with the bias gradient summed per tile (partial sums over row blocks, added up by XLA) and the
dropout mask, where there is one, recomputed from its hash. BERT has no dropout here (rate 0): the option
exists for recipes that do. Both GELU forms: "gelu" (exact, erf; Triton has no erf, so the kernel evaluates
Abramowitz & Stegun's 7.1.26 rational form, |error| < 1.5e-7) and "gelu_tanh".
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bert_jax.kernels import common, hash_dropout as hd

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_A = 0.044715  # the tanh form's cubic coefficient


def bias_gelu_dropout(h, bias, key=None, *, approximate: bool, rate: float = 0.0,
                      rows_per_block: int | None = None):
    """dropout(GELU(h + bias)): h [..., I] in the compute dtype, bias [I] float32 -> h's shape and dtype."""
    rate = rate if key is not None else 0.0
    seed = hd.seeds(key) if rate else jnp.zeros((2,), jnp.uint32)
    shape, width = h.shape, h.shape[-1]
    return _fused(h.reshape(-1, width), bias, seed, approximate, rate, rows_per_block).reshape(shape)


def reference(h, bias, key=None, *, approximate: bool, rate: float = 0.0):
    """The same in jax.numpy: the unfused layer's bias add, jax.nn.gelu and hash dropout."""
    return hd.dropout(jax.nn.gelu(h + bias.astype(h.dtype), approximate=approximate), rate, key)


def _erf(x):
    """erf for float32 in the operations Triton has (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7)."""
    t = 1.0 / (1.0 + 0.3275911 * jnp.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return jnp.sign(x) * (1.0 - poly * jnp.exp(-x * x))


def _gelu_and_grad(u, approximate: bool):
    """(GELU(u), dGELU/du) in float32."""
    if approximate:
        t = jnp.tanh(_SQRT_2_OVER_PI * (u + _A * u * u * u))
        grad = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _A * u * u)
        return 0.5 * u * (1.0 + t), grad
    cdf = 0.5 * (1.0 + _erf(u * (1.0 / math.sqrt(2.0))))
    return u * cdf, cdf + u * _INV_SQRT_2PI * jnp.exp(-0.5 * u * u)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(h, bias, seed, approximate, rate, rows_per_block):
    return _call(False, h, bias, seed, None, approximate, rate, rows_per_block)[0]


def _fused_fwd(h, bias, seed, approximate, rate, rows_per_block):
    return _fused(h, bias, seed, approximate, rate, rows_per_block), (h, bias, seed)


def _fused_bwd(approximate, rate, rows_per_block, saved, dy):
    h, bias, seed = saved
    dh, d_bias = _call(True, h, bias, seed, dy, approximate, rate, rows_per_block)
    return dh, d_bias.sum(0)[:h.shape[1]], common.zero_cotangent(seed)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _call(backward: bool, h, bias, seed, dy, approximate, rate, rows_per_block):
    """The forward kernel -> (y,), or the backward -> (dh, bias-gradient partials [blocks, bw])."""
    n, width = h.shape
    br = rows_per_block or common.block_rows(width, n)

    def run(h, *args):
        *dy, bias, seed, base = args
        rows = h.shape[0]
        bw, grid = common.block_width(width), pl.cdiv(rows, br)
        tile = pl.BlockSpec((br, bw), lambda g: (g, 0))
        in_specs = [tile] * (1 + len(dy)) + [pl.BlockSpec((bw,), lambda g: (0,)), common.seed_spec(width)]
        out_specs = [tile] + ([pl.BlockSpec((None, bw), lambda g: (g, 0))] if backward else [])
        out_shape = [jax.ShapeDtypeStruct((rows, width), h.dtype)]
        out_shape += [jax.ShapeDtypeStruct((grid, bw), jnp.float32)] if backward else []
        kernel = functools.partial(_backward_kernel if backward else _forward_kernel, n_rows=rows, width=width,
                                   approximate=approximate, rate=rate, br=br)
        return common.call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                           name="bias_gelu_dropout_" + ("bwd" if backward else "fwd"),
                           )(h, *dy, bias, common.seed_block(seed, base, width))

    row_args = (h,) if dy is None else (h, dy)
    return common.on_row_shards(run, row_args, (bias, seed), width=width)


def _activation(h_ref, bias_ref, seed_ref, n_rows, width, approximate, rate, br):
    """(GELU(h + bias) in float32, its derivative, the keep-and-scale factor or None, the tile mask)."""
    rows, cols, mask = common.tile_indices(pl.program_id(0), n_rows, width, br)
    h = plgpu.load(h_ref, mask=mask, other=0.0).astype(jnp.float32)
    bias = plgpu.load(bias_ref, mask=cols < width, other=0.0)
    u = (h + bias[None, :].astype(h_ref.dtype).astype(jnp.float32)).astype(h_ref.dtype).astype(jnp.float32)
    y, grad = _gelu_and_grad(u, approximate)
    factor = None
    if rate:
        index = common.element_index(seed_ref, rows, cols, width)
        keep = hd.draws(index, common.seed_row(seed_ref, 0), common.seed_row(seed_ref, 1)) >= hd.threshold(rate)
        factor = jnp.where(keep, hd.keep_scale(rate), 0.0)
    return y, grad, factor, mask


def _forward_kernel(h_ref, bias_ref, seed_ref, y_ref, *, n_rows, width, approximate, rate, br):
    y, _, factor, mask = _activation(h_ref, bias_ref, seed_ref, n_rows, width, approximate, rate, br)
    y = y.astype(y_ref.dtype)
    if factor is not None:
        y = (y.astype(jnp.float32) * factor).astype(y_ref.dtype)
    plgpu.store(y_ref, y, mask=mask)


def _backward_kernel(h_ref, dy_ref, bias_ref, seed_ref, dh_ref, d_bias_ref, *, n_rows, width, approximate,
                     rate, br):
    _, grad, factor, mask = _activation(h_ref, bias_ref, seed_ref, n_rows, width, approximate, rate, br)
    dy = plgpu.load(dy_ref, mask=mask, other=0.0).astype(jnp.float32)
    if factor is not None:
        dy = dy * factor
    dh = jnp.where(mask, dy * grad, 0.0)
    plgpu.store(dh_ref, dh.astype(dh_ref.dtype), mask=mask)
    d_bias_ref[...] = dh.sum(axis=0)
