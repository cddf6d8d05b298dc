"""The training state (a typed pytree) and its shape-first creation: abstract shapes -> shardings -> jit(init).

The same abstract state, with its shardings, is the restore target of orbax, so a checkpoint restores onto
whatever mesh the run has now.
"""

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from bert_jax import sharding


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params: nested dict of arrays; opt_state: optax state; rng: uint32 [2] base key."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@flax.struct.dataclass
class StateLayout:
    """Everything needed to build or restore a TrainState on a mesh (static: not a pytree of arrays)."""

    graphdef: Any = flax.struct.field(pytree_node=False)
    abstract: TrainState = flax.struct.field(pytree_node=False)  # ShapeDtypeStructs with shardings
    shardings: TrainState = flax.struct.field(pytree_node=False)


def state_layout(model_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh,
                 rules=sharding.DEFAULT_RULES) -> StateLayout:
    """Shapes and shardings of the whole state, computed without allocating anything."""
    graphdef, abstract_params, params_shardings = sharding.abstract_params(model_fn, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = sharding.like_params_shardings(abstract_opt, params_shardings, mesh)
    rep = sharding.replicated(mesh)
    shardings = TrainState(step=rep, params=params_shardings, opt_state=opt_shardings, rng=rep)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return StateLayout(graphdef=graphdef, abstract=abstract, shardings=shardings)


def create_state(model_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh, layout: StateLayout,
                 seed: int, rules=sharding.DEFAULT_RULES, params=None) -> TrainState:
    """A fresh state, created directly in its sharded layout. `model_fn` builds the model from nnx.Rngs(seed)
    on its own, so the same seed gives the same parameters on any mesh. `params` (host arrays with the
    layout's shapes), when given, replace the initialisation: continued pretraining from `init_from`."""
    if params is None:
        params = sharding.init_params(model_fn, mesh, layout.shardings.params, rules)
    else:
        check_shapes(params, layout.abstract.params)
        params = jax.device_put(params, layout.shardings.params)

    def finish(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(seed + 1))

    return jax.jit(finish, out_shardings=layout.shardings, donate_argnums=0)(params)


def check_shapes(params, abstract) -> None:
    """Raises a one-line ValueError naming the first parameter whose presence or shape differs."""
    got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    for name in sorted(set(got) | set(want)):
        if got.get(name) != want.get(name):
            raise ValueError(f"parameter {name}: the model needs shape {want.get(name)}, "
                             f"the checkpoint has {got.get(name)}")
