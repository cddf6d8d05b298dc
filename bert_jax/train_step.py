"""The pure training and evaluation steps. `make_train_step` jits them once, with explicit shardings and
the state donated. Per-step randomness is fold_in(state.rng, state.step): masking and dropout are a function
of the step alone, which makes resumed runs identical to uninterrupted ones.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def _split_micro(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] with row r in micro-batch r % n, so every device feeds every micro-batch."""
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def _finish_metrics(sums: dict) -> dict:
    return {k: num / jnp.maximum(den, 1.0) for k, (num, den) in sums.items()}


def train_step(state, batch: dict, *, graphdef, tx: optax.GradientTransformation, objective, accum_steps: int = 1):
    """(TrainState, batch of [B, S] int32 arrays) -> (new TrainState, metrics of scalars)."""
    rng = jax.random.fold_in(state.rng, state.step)
    mask_rng, dropout_rng = jax.random.split(rng)
    masked = objective.corrupt(mask_rng, batch)
    norms = objective.normalizers(batch, masked)

    def loss_fn(params, micro_batch, micro_masked, key):
        model = nnx.merge(graphdef, params)
        return objective.loss(model, micro_batch, micro_masked, key, norms)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, sums), grads = grad_fn(state.params, batch, masked, dropout_rng)
    else:
        micro = jax.tree.map(lambda x: _split_micro(x, accum_steps), (batch, masked))
        keys = jax.random.split(dropout_rng, accum_steps)

        def body(carry, xs):
            (micro_batch, micro_masked), key = xs
            (loss_i, sums_i), grads_i = grad_fn(state.params, micro_batch, micro_masked, key)
            return jax.tree.map(jnp.add, carry, (loss_i, sums_i, grads_i)), None

        (_, sums0), _ = jax.eval_shape(grad_fn, state.params, *jax.tree.map(lambda x: x[0], micro), keys[0])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             (jax.ShapeDtypeStruct((), jnp.float32), sums0, state.params))
        (loss, sums, grads), _ = jax.lax.scan(body, zeros, (micro, keys))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # NaN guard: a non-finite loss or gradient (the norm is non-finite iff some gradient is) keeps the old
    # parameters and optimizer state; selected on device, so no host sync. The step still counts (its batch
    # is consumed), and `skipped` reports it.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": 1.0 - ok.astype(jnp.float32),
               **_finish_metrics(sums)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, rng: jax.Array, *, graphdef, objective) -> dict:
    """Deterministic (no dropout) evaluation: {metric: (numerator, denominator)} sums for this batch."""
    masked = objective.corrupt(rng, batch)
    norms = objective.normalizers(batch, masked)
    _, sums = objective.loss(nnx.merge(graphdef, params), batch, masked, None, norms)
    return sums


def make_train_step(layout, batch_sharding, *, tx, objective, accum_steps: int = 1):
    """jit(train_step) with explicit in/out shardings and the state donated."""
    fn = functools.partial(train_step, graphdef=layout.graphdef, tx=tx, objective=objective,
                           accum_steps=accum_steps)
    return jax.jit(fn, in_shardings=(layout.shardings, batch_sharding),
                   out_shardings=(layout.shardings, None), donate_argnums=0)


def make_eval_step(layout, batch_sharding, *, objective):
    fn = functools.partial(eval_step, graphdef=layout.graphdef, objective=objective)
    return jax.jit(fn, in_shardings=(layout.shardings.params, batch_sharding, None))
