"""What the Pallas kernels share: block sizes, the seed block, how a kernel is called, and how it runs on a mesh.

Every kernel works on a 2-D view [rows, width] of its tensors, one tile of [block_rows, block_width] per
program, where block_width is the width rounded up to a power of two (Triton's loads and stores must have a
power-of-two size) and loads and stores are masked at the edges: any shape works, dividing or not. Statistics
and the math run in float32; tensors are stored in their own dtype. On a GPU the kernels are compiled by
Triton; elsewhere (this CPU, the tests) they run in Pallas' interpret mode, which computes the same values.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd as flax_spmd
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from bert_jax.axis_rules import DEFAULT_RULES, MESH_AXES

TILE_ELEMENTS = 8192  # elements per program's tile: ~64 float32 registers per thread at 4 warps


def block_width(width: int) -> int:
    return max(16, pl.next_power_of_2(width))


def block_rows(width: int, rows: int | None = None) -> int:
    """Rows per program: a power of two with block_rows * block_width ~ TILE_ELEMENTS (at most `rows`' next
    power of two, so small inputs are one program)."""
    br = max(1, TILE_ELEMENTS // block_width(width))
    return br if rows is None else max(1, min(br, pl.next_power_of_2(rows)))


def interpret() -> bool:
    """Triton kernels compile for GPUs only; everywhere else Pallas interprets them (tests, CPU runs)."""
    return jax.default_backend() != "gpu"


def call(kernel: Callable, *, grid: int, in_specs, out_specs, out_shape, name: str):
    """pl.pallas_call with our defaults: a 1-D grid over row blocks, 4 warps, interpret mode off the GPU."""
    params = {} if interpret() else {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=1)}
    return pl.pallas_call(kernel, grid=(grid,), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=interpret(), name=name, **params)


def seed_block(seed: jax.Array, base: jax.Array, width: int) -> jax.Array:
    """uint32 [3, block_width]: rows seed word 0, seed word 1, and the index of this call's element (0, 0) in
    the global tensor, each broadcast along a row. A kernel reads them as vectors (one row load each): Triton
    has no cheap way to take a scalar out of a loaded tensor."""
    words = jnp.stack([seed[0], seed[1], jnp.asarray(base, jnp.uint32)])
    return jnp.broadcast_to(words[:, None], (3, block_width(width)))


def seed_spec(width: int) -> pl.BlockSpec:
    return pl.BlockSpec((3, block_width(width)), lambda g: (0, 0))


def tile_indices(g, n_rows: int, width: int, br: int):
    """Program g's (row ids [br], column ids [bw], the [br, bw] in-bounds mask)."""
    rows = g * br + jnp.arange(br)
    cols = jnp.arange(block_width(width))
    return rows, cols, (rows < n_rows)[:, None] & (cols < width)[None, :]


def element_index(seed_ref, rows, cols, row_stride: int) -> jax.Array:
    """uint32 [br, bw]: each element's row-major index in the global tensor (see `seed_block`)."""
    return (seed_row(seed_ref, 2) + rows.astype(jnp.uint32)[:, None] * jnp.uint32(row_stride)
            + cols.astype(jnp.uint32)[None, :])


def seed_row(seed_ref, i: int) -> jax.Array:
    """Row i of the seed block, uint32 [1, block_width]."""
    return plgpu.load(seed_ref.at[pl.ds(i, 1)])


def zero_cotangent(x: jax.Array) -> np.ndarray:
    """The cotangent of an integer input (the seed) of a custom VJP."""
    return np.zeros(x.shape, jax.dtypes.float0)


def batch_axes() -> tuple[str, ...]:
    """The mesh axes the rules put the batch on (data, fsdp by default)."""
    batch = dict(flax_spmd.get_logical_axis_rules() or DEFAULT_RULES).get("batch")
    return (batch,) if isinstance(batch, str) else tuple(batch or ())


def active_mesh():
    """The abstract mesh a step is being traced under, if it has our axes (bert_jax.sharding.in_mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else mesh


def on_row_shards(fn: Callable, row_args: tuple, other_args: tuple, width: int):
    """fn(*row_args, *other_args, base) on each device's rows when traced under a mesh, else on all rows.

    row_args are [rows, ...] arrays whose rows are split over the batch axes; other_args are replicated;
    `base` (uint32) is the global index of the shard's first element (row offset x width), so the hash masks
    do not depend on the sharding. fn's outputs are row-split: its [rows, ...] results, and partial sums
    [k, ...] per shard, concatenated over the shards (the caller sums them)."""
    mesh = active_mesh()
    axes = batch_axes() if mesh is not None else ()
    shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if shards == 1 or row_args[0].shape[0] % shards:
        return fn(*row_args, *other_args, jnp.uint32(0))

    def local(*args):
        rows = args[0].shape[0]
        base = (jax.lax.axis_index(axes).astype(jnp.uint32) * jnp.uint32(rows * width))
        return fn(*args, base)

    rows_spec = P(axes)
    out = jax.shard_map(local, mesh=mesh, in_specs=(rows_spec,) * len(row_args) + (P(),) * len(other_args),
                        out_specs=rows_spec, check_vma=False)
    return out(*row_args, *other_args)
