"""Device mesh, logical-axis rules and the shardings of state and batches.

Mesh axes: data (pure data parallel), fsdp (data parallel whose parameters and optimizer state are sharded,
ZeRO-3 style), tensor (attention heads, MLP and vocabulary split across devices). Parameters carry logical
axis names; `DEFAULT_RULES` maps each logical name to mesh axes, in one table (the config's `mesh.rules`
overrides entries of it: `rules_from_config`). Activations are constrained at each layer boundary
(`constrain_activations`) when a step is traced under `in_mesh`: rows over (data, fsdp), the sequence and
hidden dimensions whole, which is what both the fsdp all-gathers and the tensor-parallel all-reduces expect.
"""

import functools
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bert_jax import axis_rules

# The rules table lives in the jax-free bert_jax.axis_rules; these names are part of this module's API.
MESH_AXES, DEFAULT_RULES, LOGICAL_AXES = axis_rules.MESH_AXES, axis_rules.DEFAULT_RULES, axis_rules.LOGICAL_AXES
rules_to_strings, rules_from_config = axis_rules.rules_to_strings, axis_rules.rules_from_config


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves one -1 entry to fill `num_devices`; raises a one-line error when the sizes do not fit."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one of mesh.data/fsdp/tensor may be -1, got {sizes}")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh: sizes must be positive or -1, got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh: {sizes} uses {math.prod(sizes.values())} devices, but {num_devices} exist")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch are split over data x fsdp; the sequence axis is not split."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def constrain_activations(x: jax.Array) -> jax.Array:
    """Hidden states [B, S, H] at a layer boundary: rows over the rules' batch axes, S and H whole.

    Active only while tracing under a mesh with our axes (`in_mesh`); otherwise, or when B does not divide,
    it returns `x` unchanged. Pinning the layout between layers keeps XLA from carrying an fsdp- or
    tensor-sharded hidden dimension across the scan, which would add collectives inside every layer."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    batch = dict(flax_spmd.get_logical_axis_rules() or DEFAULT_RULES).get("batch")
    names = (batch,) if isinstance(batch, str) else tuple(batch or ())
    if x.shape[0] % math.prod(mesh.shape[a] for a in names):
        return x
    return jax.lax.with_sharding_constraint(x, P(batch, *(None,) * (x.ndim - 1)))


def in_mesh(fn, mesh: Mesh, rules=DEFAULT_RULES):
    """`fn` called (and so traced) under `mesh` and `rules`, which switches on `constrain_activations`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return fn(*args, **kwargs)

    return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_params(model_fn, mesh: Mesh, rules=DEFAULT_RULES):
    """(graphdef, abstract params as a pure dict, NamedShardings of the params) with nothing allocated."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(model_fn))
        specs = nnx.get_partition_spec(abstract_state)
    abstract = nnx.to_pure_dict(abstract_state)
    shardings = jax.tree.map(lambda x, p: NamedSharding(mesh, divisible_spec(p, x.shape, mesh)),
                             abstract, nnx.to_pure_dict(specs))
    return graphdef, abstract, shardings


def divisible_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """`spec` with the mesh axes removed from any dimension they do not divide (e.g. a vocabulary of 30522
    rows over tensor=4): that dimension is then replicated instead of failing to compile."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if size and dim % size == 0 else None)
    return P(*out)


def init_params(model_fn, mesh: Mesh, shardings, rules=DEFAULT_RULES):
    """Parameters created directly in their sharded layout (no full copy on any device)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return jax.jit(lambda: nnx.to_pure_dict(nnx.state(model_fn())), out_shardings=shardings)()


def like_params_shardings(tree, params_shardings, mesh: Mesh):
    """Shardings for a tree (e.g. an optax state) whose params-shaped subtrees follow the params' layout
    and whose other leaves (step counters, scalars) are replicated."""
    params_struct = jax.tree.structure(params_shardings)

    def is_params_like(node):
        try:
            return jax.tree.structure(node) == params_struct
        except Exception:  # pylint: disable=broad-except
            return False

    return jax.tree.map(lambda node: params_shardings if is_params_like(node) else replicated(mesh),
                        tree, is_leaf=is_params_like)


def bytes_per_device(tree) -> int:
    """Bytes held by device 0 for a tree of jax.Arrays or sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard_shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shard_shape) * np.dtype(x.dtype).itemsize
    return total
