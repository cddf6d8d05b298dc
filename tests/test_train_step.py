"""The jitted train step: gradient accumulation equals the large batch; sharded equals one device; the
loss falls on learnable data."""

import jax
import numpy as np
import pytest
from flax import nnx

from bert_jax import masking, objectives, optim, sharding, train_state, train_step
from bert_jax.models import BertForMaskedLM, EncoderConfig

VOCAB = 97
SPEC = masking.MaskingSpec(vocab_size=VOCAB, mask_id=4, pad_id=0, special_ids=(0, 1, 2, 3, 4), max_predictions=6)


def _cfg(dropout=0.0):
    return EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                         max_position_embeddings=32, hidden_dropout=dropout, attention_dropout=dropout)


def _batch(n=16, s=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (n, s)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 3
    ids[: n // 2, -4:] = 0  # some padding
    mask = (ids != 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _run(mesh, steps, batches, accum=1, dropout=0.0, lr=1e-2):
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=lr, warmup_steps=0, total_steps=100))
    model_fn = lambda: BertForMaskedLM(_cfg(dropout), nnx.Rngs(0))  # noqa: E731
    layout = train_state.state_layout(model_fn, tx, mesh)
    state = train_state.create_state(model_fn, tx, mesh, layout, seed=0)
    step = train_step.make_train_step(layout, sharding.batch_sharding(mesh), tx=tx,
                                      objective=objectives.MlmObjective(SPEC), accum_steps=accum)
    step = sharding.in_mesh(step, mesh)  # as training.py runs it: activation constraints on
    losses = []
    for i in range(steps):
        state, m = step(state, batches[i % len(batches)])
        losses.append(float(m["loss"]))
    return jax.device_get(state.params), losses


def _assert_trees_close(a, b, rtol, atol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_gradient_accumulation_equals_large_batch():
    one = sharding.make_mesh(devices=jax.devices()[:1])
    batches = [_batch(seed=0), _batch(seed=1)]
    p1, l1 = _run(one, 2, batches, accum=1)
    p4, l4 = _run(one, 2, batches, accum=4)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    _assert_trees_close(p1, p4, rtol=1e-4)


EQUIV_STEPS = 5
# The attention key bias gets no gradient in exact arithmetic (softmax is invariant to adding q.b_k to every
# key's score), so it holds only rounding noise (~1e-13 gradients) that Adam divides by its own tiny second
# moment: its value stays ~1e-7 and differs in relative terms between ANY two summation orders.
ZERO_GRADIENT_LEAVES = ("['attention']['key']['bias']",)


@pytest.fixture(scope="module")
def one_device_run():
    return _run(sharding.make_mesh(devices=jax.devices()[:1]), EQUIV_STEPS, [_batch(seed=0), _batch(seed=1)])


def norm_rel_diffs(a, b) -> dict:
    """{leaf path: ||a - b||_2 / ||a||_2}. Norm-wise rather than element-wise: sharded contractions sum in
    another order (f32 rounding ~1e-7 relative per sum), and an element that crosses zero makes an
    element-wise ratio meaningless while the leaf as a whole agrees to ~1e-7."""
    return {jax.tree_util.keystr(p): float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30))
            for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b))}


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_equals_one_device(shape, one_device_run):
    """5 steps of the same global batches: losses and parameters equal to one device's within 1e-5 (f32)."""
    p1, l1 = one_device_run
    p8, l8 = _run(sharding.make_mesh(*shape), EQUIV_STEPS, [_batch(seed=0), _batch(seed=1)])
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    diffs = norm_rel_diffs(p1, p8)
    for name, rel in diffs.items():
        if name.endswith(ZERO_GRADIENT_LEAVES):
            x, y = (np.asarray(jax.tree.leaves(p)[list(diffs).index(name)]) for p in (p1, p8))
            assert np.abs(x).max() < 1e-5 and np.abs(y).max() < 1e-5, name  # stayed at its (zero) initial value
        else:
            assert rel <= 1e-5, (name, rel)
    total = (sum(np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
             / sum(np.sum(x ** 2) for x in jax.tree.leaves(p1))) ** 0.5
    assert total <= 1e-5, total  # the whole tree, key bias included


def test_loss_falls_and_dropout_is_fresh_each_step():
    one = sharding.make_mesh(devices=jax.devices()[:1])
    # Learnable data: every row is the same short sequence, so masked tokens are predictable from context.
    ids = np.tile(np.r_[2, np.arange(5, 27), 3].astype(np.int32), (16, 1))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    _, losses = _run(one, 40, [batch], dropout=0.1, lr=3e-3)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_parameter_bytes_per_device_shrink_with_fsdp_and_tensor():
    cfg = EncoderConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                        max_position_embeddings=32)
    model_fn = lambda: BertForMaskedLM(cfg, nnx.Rngs(0))  # noqa: E731
    per_device = {}
    for shape in ((8, 1, 1), (1, 8, 1), (1, 2, 4)):
        _, abstract, shardings = sharding.abstract_params(model_fn, sharding.make_mesh(*shape))
        sized = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        per_device[shape] = sharding.bytes_per_device(sized)
    total = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))  # float32 parameters
    assert per_device[(8, 1, 1)] == total  # pure data parallel: a full copy everywhere
    # Sharded over 8 devices: only small vectors (LayerNorm, biases of 64) and non-divisible axes stay whole.
    assert per_device[(1, 8, 1)] < total / 4
    assert per_device[(1, 2, 4)] < total / 4
