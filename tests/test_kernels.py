"""The Pallas kernels (bert_jax/kernels) against their XLA references, values and gradients.

On this CPU the kernels run in Pallas' interpret mode; tools/gpu_benchmark.sh runs this file on a GPU, where
they are compiled by Triton. Tolerances: float32 outputs within 2e-5 (x their scale) of the reference; in
bfloat16 both the kernel and the XLA path are compared with the float32 computation, and the kernel's error
may be at most the XLA path's plus one bfloat16 rounding of the output (the kernels keep float32 inside,
where XLA rounds some intermediates to bfloat16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from bert_jax import optim, sharding
from bert_jax.kernels import adamw, gelu, hash_dropout as hd, layernorm

BF16_ULP = 2.0 ** -7


def _vjp_all(fn, args, cot):
    out, vjp = jax.vjp(fn, *args)
    return [out, *vjp(cot)]


def _assert_close(kernel_fn, reference_fn, args, dtype, rtol=2e-5):
    """Outputs and gradients of kernel_fn equal reference_fn's (see the module docstring for bf16)."""
    key = jax.random.key(42)
    cot = jax.random.normal(key, jax.eval_shape(reference_fn, *args).shape).astype(dtype)
    got = _vjp_all(jax.jit(kernel_fn), args, cot)
    if dtype == jnp.float32:
        want = _vjp_all(jax.jit(reference_fn), args, cot)
        for g, w in zip(got, want):
            scale = float(jnp.abs(w).max()) + 1e-6
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=rtol * scale)
        return
    as32 = lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a  # noqa: E731
    truth = _vjp_all(jax.jit(reference_fn), [as32(a) for a in args], cot.astype(jnp.float32))
    xla = _vjp_all(jax.jit(reference_fn), args, cot)
    for g, x, t in zip(got, xla, truth):
        g, x, t = (np.asarray(a, np.float32) for a in (g, x, t))
        scale = float(np.abs(t).max()) + 1e-6
        assert np.abs(g - t).max() <= np.abs(x - t).max() + BF16_ULP * scale, (np.abs(g - t).max(),
                                                                            np.abs(x - t).max(), scale)


# ------------------------------------------------------------------------------------------- hash dropout
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_hash_dropout_masks_are_unbiased_and_independent(rate):
    n_rows, width = 512, 768
    keep = np.asarray(hd.keep_mask(hd.seeds(jax.random.key(0)), (n_rows, width), rate), np.float64)
    other = np.asarray(hd.keep_mask(hd.seeds(jax.random.key(1)), (n_rows, width), rate), np.float64)
    n, p = keep.size, 1 - hd.threshold(rate) / 2 ** hd.KEEP_BITS
    assert abs(p - (1 - rate)) < 2 ** -24
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(keep.mean() - p) < 4.5 * sigma
    # neighbours along a row, along a column, the same element under another seed: uncorrelated
    limit = 4.5 / np.sqrt(n)
    for a, b in ((keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1]), (keep, other)):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < limit
    # per-row counts spread as a binomial's (chi-square of the row sums, 4.5 sigma of its own spread)
    counts = keep.sum(1)
    chi2 = np.sum((counts - width * p) ** 2 / (width * p * (1 - p)))
    assert abs(chi2 - n_rows) < 4.5 * np.sqrt(2 * n_rows)
    # inverted dropout keeps the expectation; evaluation (no key) is the identity
    x = jnp.ones((n_rows, width))
    assert abs(float(hd.dropout(x, rate, jax.random.key(3)).mean()) - 1) < 4.5 * sigma / p
    assert hd.dropout(x, rate, None) is x


def test_hash_dropout_mask_is_a_function_of_the_global_index():
    seed = hd.seeds(jax.random.key(5))
    full = hd.keep_mask(seed, (6, 10), 0.3)
    np.testing.assert_array_equal(hd.keep_mask(seed, (2, 10), 0.3, base=40), full[4:])


# ---------------------------------------------------------------------------------------------- layernorm
@pytest.mark.parametrize("rows, width, rows_per_block, dtype, rate", [
    (64, 128, None, jnp.float32, 0.1),    # dividing the blocks
    (37, 100, 8, jnp.float32, 0.1),       # rows and width that do not
    (16, 64, 4, jnp.float32, 0.0),        # no dropout
    (37, 100, 8, jnp.bfloat16, 0.1),
    (32, 768, None, jnp.bfloat16, 0.1),   # BERT-base's width
])
def test_residual_dropout_layernorm_equals_xla(rows, width, rows_per_block, dtype, rate):
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (rows, width)).astype(dtype)
    res = (3 * jax.random.normal(k[1], (rows, width)) + 1).astype(dtype)
    scale = 1 + 0.2 * jax.random.normal(k[2], (width,))
    bias = 0.2 * jax.random.normal(k[3], (width,))
    key = jax.random.key(9)
    fused = lambda *a: layernorm.residual_dropout_layernorm(*a, key, rate=rate, eps=1e-12,  # noqa: E731
                                                            rows_per_block=rows_per_block)
    ref = lambda *a: layernorm.reference(*a, key, rate=rate, eps=1e-12)  # noqa: E731
    _assert_close(fused, ref, (x, res, scale, bias), dtype)


def test_layernorm_keeps_leading_axes_and_evaluation_has_no_dropout():
    x = jax.random.normal(jax.random.key(0), (2, 5, 48))
    ones, zeros = jnp.ones(48), jnp.zeros(48)
    y = layernorm.residual_dropout_layernorm(x, x, ones, zeros, None, rate=0.5, eps=1e-6)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, layernorm.reference(x, x, ones, zeros, None, rate=0.0, eps=1e-6), atol=1e-5)


# --------------------------------------------------------------------------------------------------- gelu
@pytest.mark.parametrize("rows, width, rows_per_block, dtype, approximate, rate", [
    (64, 256, None, jnp.float32, False, 0.0),
    (37, 100, 8, jnp.float32, True, 0.0),
    (37, 100, 8, jnp.float32, False, 0.1),
    (37, 100, 8, jnp.bfloat16, False, 0.0),
    (32, 3072, None, jnp.bfloat16, True, 0.0),  # BERT-base's MLP width
    (30, 96, 4, jnp.bfloat16, True, 0.1),
])
def test_bias_gelu_dropout_equals_xla(rows, width, rows_per_block, dtype, approximate, rate):
    k = jax.random.split(jax.random.key(2), 2)
    h = (2 * jax.random.normal(k[0], (rows, width))).astype(dtype)
    bias = 0.3 * jax.random.normal(k[1], (width,))
    key = jax.random.key(4)
    fused = lambda h, b: gelu.bias_gelu_dropout(h, b, key, approximate=approximate, rate=rate,  # noqa: E731
                                                rows_per_block=rows_per_block)
    ref = lambda h, b: gelu.reference(h, b, key, approximate=approximate, rate=rate)  # noqa: E731
    _assert_close(fused, ref, (h, bias), dtype)


# -------------------------------------------------------------------------------------------------- adamw
def test_fused_adamw_equals_optax_chain():
    """Five updates with the clipping on and off (large and small gradients), decay masked as the recipes."""
    params = {"layer": {"kernel": jnp.ones((33, 70)), "bias": jnp.zeros((70,))},
              "norm": {"scale": jnp.ones((5000,))}, "embed": jnp.full((3, 4, 5), 0.5)}
    c = optim.OptimConfig(learning_rate=1e-3, warmup_steps=2, total_steps=10, b2=0.98, weight_decay=0.01)
    ref, fused = optim.make_optimizer(c), optim.make_optimizer(c, fused=True)
    assert isinstance(fused.init(params), adamw.FusedAdamWState)
    s_ref, s_fused, p_ref, p_fused = ref.init(params), fused.init(params), params, params
    for i in range(5):
        g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape) * (3.0 if i % 2 else 0.01),
                         params)
        u, s_ref = jax.jit(ref.update)(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        u, s_fused = jax.jit(fused.update)(g, s_fused, p_fused)
        p_fused = optax.apply_updates(p_fused, u)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_fused)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(p_ref["embed"] - 0.5).max()) > 1e-3  # it did move


# ------------------------------------------------------------------------------------------- on the mesh
def test_kernels_run_sharded_over_eight_devices_with_the_unsharded_masks():
    """Under a data=8 mesh the kernels run per device (shard_map) on global element indices: the same
    values and gradients as on one device."""
    mesh = sharding.make_mesh(data=8)
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (16, 8, 64))
    res = jax.random.normal(k[1], (16, 8, 64))
    bias = 0.1 * jax.random.normal(k[2], (64,))
    key = jax.random.key(6)

    def loss(x, res, bias):
        y = layernorm.residual_dropout_layernorm(x, res, jnp.ones(64), bias, key, rate=0.2, eps=1e-6)
        return jnp.sum(gelu.bias_gelu_dropout(y, bias, key, approximate=False, rate=0.1) ** 2)

    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, res, bias)
    rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    sharded = sharding.in_mesh(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), mesh)
    got = sharded(jax.device_put(x, rows), jax.device_put(res, rows), bias)
    assert "shard_map" in str(sharding.in_mesh(jax.make_jaxpr(loss), mesh)(x, res, bias))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------ the Triton lowering
def test_every_kernel_lowers_to_triton_for_a_gpu(monkeypatch):
    """Lowered for CUDA on this CPU (jax's cross-platform lowering, interpret mode off), every kernel goes
    through Pallas' Triton emitter: unsupported operations and non-power-of-two loads fail here, not on a GPU.
    (Triton's own compilation to PTX happens only on a GPU: tools/gpu_benchmark.sh kernels.)"""
    from bert_jax.kernels import common
    monkeypatch.setattr(common, "interpret", lambda: False)
    key = jax.random.key(0)
    x, vec = jnp.ones((300, 768), jnp.bfloat16), jnp.ones(768)
    h, mlp_bias = jnp.ones((300, 3072), jnp.bfloat16), jnp.ones(3072)

    def steps(x, vec, h, mlp_bias, params, opt_state):
        ln = lambda x, r, s, b: jnp.sum(layernorm.residual_dropout_layernorm(  # noqa: E731
            x, r, s, b, key, rate=0.1, eps=1e-12).astype(jnp.float32))
        act = lambda h, b, approximate: jnp.sum(gelu.bias_gelu_dropout(  # noqa: E731
            h, b, key, approximate=approximate, rate=0.1).astype(jnp.float32))
        grads = (jax.value_and_grad(ln, argnums=(0, 1, 2, 3))(x, x, vec, vec),
                 jax.value_and_grad(act, argnums=(0, 1))(h, mlp_bias, True),
                 jax.value_and_grad(act, argnums=(0, 1))(h, mlp_bias, False))
        return grads, tx.update(params, opt_state, params)

    tx = optim.make_optimizer(optim.OptimConfig(), fused=True)
    params = {"kernel": jnp.ones((100, 70)), "bias": jnp.ones(70)}
    text = jax.jit(steps).trace(x, vec, h, mlp_bias, params, tx.init(params)).lower(
        lowering_platforms=("cuda",)).as_text()
    for name in ("residual_dropout_layernorm_fwd", "residual_dropout_layernorm_bwd", "bias_gelu_dropout_fwd",
                 "bias_gelu_dropout_bwd", "fused_adamw"):
        assert f'"{name}"' in text, name


# ------------------------------------------------------------------------------------------ in training
@pytest.mark.slow
def test_fifty_training_steps_with_the_kernels_track_the_plain_path(docstring_shards, tmp_path):
    """The real training loop on 8 devices (data parallel: the kernels under shard_map). With every kernel on,
    the loss equals the XLA path with the same hash dropout masks within 1e-3 (relative) at each of 50 steps;
    the plain path (threefry masks) draws other masks, so its curve is compared by its last 10 steps' mean
    (within 3%)."""
    import json
    import os

    from bert_jax import trainer
    from configs import bert as bert_configs

    def losses(kernels):
        c = bert_configs.get_config("tiny")
        with c.unlocked():
            c.data.dir, c.data.seq_len, c.data.shuffle_buffer = docstring_shards, 64, 1000
            c.model.num_layers, c.model.hidden_size, c.model.intermediate_size = 1, 64, 128
            c.model.kernels = kernels
            c.train.batch_size, c.train.steps, c.train.log_every, c.train.eval_every = 16, 50, 1, 0
            c.optim.warmup_steps, c.checkpoint.every = 5, 50
        workdir = str(tmp_path / (kernels or "plain"))
        trainer.train_and_evaluate(c, workdir)
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        return np.array([r["train/loss"] for r in records if "train/loss" in r])

    xla_hash = losses("hash_dropout")
    fused = losses("hash_dropout+layernorm+gelu+adamw")
    plain = losses("")
    assert len(fused) == len(xla_hash) == len(plain) == 50
    np.testing.assert_allclose(fused, xla_hash, rtol=1e-3)
    assert fused[-10:].mean() < fused[:5].mean() - 0.5  # it trains
    assert abs(fused[-10:].mean() - plain[-10:].mean()) < 0.03 * plain[-10:].mean()
