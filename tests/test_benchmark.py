"""Performance means and their benchmark: tools.benchmark end to end (tiny shapes), the dot_product attention
switch equals the einsum path, bf16 compute tracks f32 in training, device prefetch keeps order."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bert_jax import flops, masking, objectives, optim, prefetch, sharding, train_state, train_step
from bert_jax.models import BertForMaskedLM, EncoderConfig
from bert_jax.models.layers import SelfAttention, even_lengths, relative_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(*args, timeout=300, env=None):
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tools.benchmark", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_benchmark_cli_times_the_real_step_and_reports_mfu():
    p = _tool("--configs", "tiny", "--batch-size", "4", "--seq-len", "16", "--steps", "2", "--warmup", "1",
              "--matmul-size", "256", "--peers", "--peer-python", "/nonexistent/python", "--peak-tflops", "0.5")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["settings"]["formula"] == flops.FORMULA
    assert out["matmul"]["peak_gflops"] > 0
    r = out["configs"]["tiny"]
    assert "error" not in r, r
    cfg = EncoderConfig(vocab_size=30522, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512)
    assert r["max_predictions"] == 3  # ceil(0.15 x 16)
    assert r["flops_per_step"] == flops.train_step_flops(cfg, 4, 16, 3)
    assert r["tokens_per_s"] == pytest.approx(4 * 16 / r["step_s"])
    assert r["sequences_per_s"] == pytest.approx(4 / r["step_s"])
    assert r["mfu_datasheet"] == pytest.approx(r["flops_per_step"] / r["step_s"] / 0.5e12)
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_s"] / 1e9 / out["matmul"]["peak_gflops"])
    assert r["compile_s"] > 0 and r["peak_rss_mib"] > 100
    assert np.isfinite(r["last_loss"]) and r["last_loss"] > 5  # ~ln(30522) = 10.3 at the start
    assert "tokens/s" in p.stdout and "MFU" in p.stdout
    assert out["peers"]["error"].startswith("peer venv not found at /nonexistent/python")  # reported, not fatal


def test_benchmark_without_the_backend_fails_with_one_line():
    """--backend gpu where jax finds no GPU (none visible): one error line after the first worker, not one
    per config."""
    p = _tool("--configs", "tiny", "--backend", "gpu", timeout=120, env={"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --backend gpu: worker exit 1: no GPU visible to jax"), \
        p.stderr


@pytest.mark.parametrize("args, message", [
    (["--configs", "mini,nope"], "error: --configs: unknown size 'nope'"),
    (["--configs", "deberta:mini"], "error: --configs: unknown size 'mini'; choose from ['base', 'large', 'small', 'tiny', 'xsmall']"),
    (["--ab", "attention=einsum"], "error: --ab 'attention=einsum': expected KEY=A,B"),
    (["--steps", "0"], "error: --steps=0 must be >= 1"),
    (["--model", "attention=cudnn"], "error: --model: model.attention='cudnn' needs model.dtype='bfloat16'"),
    (["--model", "scan_unroll=all"], "error: --model 'scan_unroll=all': 'all' is not a number"),
    (["--ab-config", "huge", "--ab", "kernels=none,gelu"], "error: --ab-config: unknown size 'huge'"),
    (["--model", "kernels=layernorm+flash"], "error: --model: model.kernels: unknown ['flash']"),
])
def test_benchmark_bad_arguments_fail_with_one_line(args, message):
    p = _tool(*args, timeout=60)
    assert p.returncode != 0
    assert p.stderr.strip().startswith(message) and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_worker_error_names_the_exception():
    """A failed config reports its exception's line, not the note JAX prints after a filtered traceback."""
    from tools.benchmark import error_line
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\njax.errors.JaxRuntimeError: "
              "NOT_FOUND: no kernel\n--------------------\nFor simplicity, JAX has removed its internal frames "
              "from the traceback of the following exception. Set JAX_TRACEBACK_FILTERING=off to include these.")
    assert error_line(stderr) == "jax.errors.JaxRuntimeError: NOT_FOUND: no kernel"
    assert error_line("killed\n") == "killed" and error_line("") == "no output"


def _attention_pair(fused="dot_product", **kw):
    kw = dict(vocab_size=50, hidden_size=32, num_heads=4, intermediate_size=64, **kw)
    with jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        a = SelfAttention(EncoderConfig(**kw, attention="einsum"), nnx.Rngs(0))
        b = SelfAttention(EncoderConfig(**kw, attention=fused), nnx.Rngs(0))
    return a, b


def _rel_err(u, v, floor=0.0):
    """||u - v|| / ||u||, the denominator at least `floor` (for tensors that are ~0 by symmetry)."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return np.linalg.norm(u - v) / max(np.linalg.norm(u), floor)


def _assert_grads_close(ga, gb, tol):
    """Each leaf of gb within `tol` (relative) of ga's. The key bias's gradient is 0 in exact arithmetic (it
    shifts a query's scores by one constant), so each denominator is at least 1e-2 of the largest leaf's norm."""
    floor = 1e-2 * max(np.linalg.norm(np.asarray(u, np.float64)) for u in jax.tree.leaves(ga))
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(ga)[0], jax.tree.leaves(gb)):
        assert _rel_err(u, v, floor) < tol, jax.tree_util.keystr(path)


@pytest.mark.parametrize("fused", ["dot_product", "cudnn"])
@pytest.mark.parametrize("bias_shape", ["keys", "full", "full_at_positions", "odd_lengths"])
def test_fused_attention_equals_einsum(fused, bias_shape):
    """attention=dot_product (XLA) and, on a GPU, attention=cudnn compute what the einsum path does, values and
    gradients (cudnn in bfloat16, its only dtype here); on a CPU, cudnn is refused by name. odd_lengths: 15
    keys and 3 queries (cuDNN's training kernels with a bias take even lengths only: `even_lengths` pads)."""
    dtype = "bfloat16" if fused == "cudnn" else "float32"
    if fused == "cudnn" and jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU; this backend is 'cpu'"):
            _attention_pair(fused, dtype=dtype, attention_dropout=0.0)
        return
    a, b = _attention_pair(fused, dtype=dtype, attention_dropout=0.0)
    seq = 15 if bias_shape == "odd_lengths" else 16
    x = jax.random.normal(jax.random.PRNGKey(1), (3, seq, 32)).astype(dtype)
    mask = np.ones((3, seq), bool)
    mask[1, 10:] = False
    positions = None
    if bias_shape == "keys":  # [B, 1, 1, S]: padding
        bias = jnp.where(mask[:, None, None, :], 0.0, -1e9)
    else:  # [B, 1, S, S]: e.g. per-document blocks
        doc = np.repeat(np.arange(2), 8)[:seq]
        bias = jnp.where((doc[:, None] == doc[None, :])[None, None] & mask[:, None, None, :], 0.0, -1e9)
        bias = jnp.broadcast_to(bias, (3, 1, seq, seq))
        if bias_shape == "full_at_positions":  # the last layer's queries at the masked positions only
            positions = jnp.array([[0, 3, 9, 15], [1, 2, 8, 8], [5, 6, 7, 14]], jnp.int32)
        if bias_shape == "odd_lengths":
            positions = jnp.array([[0, 3, 14], [1, 2, 8], [5, 6, 7]], jnp.int32)
    tol = 2e-2 if dtype == "bfloat16" else 1e-5
    with jax.default_matmul_precision("float32"):  # a GPU's default for f32 is TF32 (~1e-3)
        assert _rel_err(a(x, bias, None, positions), b(x, bias, None, positions)) < tol
        ga = nnx.state(nnx.grad(lambda m: m(x, bias, None, positions).astype(jnp.float32).sum())(a))
        gb = nnx.state(nnx.grad(lambda m: m(x, bias, None, positions).astype(jnp.float32).sum())(b))
    _assert_grads_close(ga, gb, 5 * tol)


@pytest.mark.parametrize("fused", ["dot_product", "cudnn"])
def test_relative_terms_as_the_fused_attention_bias(fused):
    """DeBERTa: attention=dot_product (XLA) and, on a GPU, attention=cudnn take the c2p + p2c terms as
    jax.nn.dot_product_attention's bias ([B, heads, T, S]): values and gradients equal the einsum path's, also for
    the last layer's queries at some positions only (3 of them: cuDNN's odd length, padded by `even_lengths`).
    f32 for dot_product (5e-5 of the largest value); cudnn in bfloat16, its only dtype (2e-2 relative, gradients
    1e-1: the relative terms pass through bf16 twice); on a CPU, cudnn is refused by name."""
    dtype = "bfloat16" if fused == "cudnn" else "float32"
    kw = dict(attention_dropout=0.0, relative_attention=True, position_buckets=8, max_relative_positions=16,
              dtype=dtype)
    if fused == "cudnn" and jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU; this backend is 'cpu'"):
            _attention_pair(fused, **kw)
        return
    a, b = _attention_pair(fused, **kw)
    cfg, seq = a.cfg, 20
    x = jax.random.normal(jax.random.PRNGKey(1), (2, seq, 32)).astype(dtype)
    emb = jax.random.normal(jax.random.PRNGKey(2), (2 * cfg.relative_span, 32))
    mask = np.ones((2, seq), bool)
    mask[1, 14:] = False
    bias = jnp.where(mask[:, None, None, :], 0.0, -1e9)
    for positions in (None, jnp.array([[0, 5, 19], [1, 2, 13]], jnp.int32)):
        index = jnp.arange(seq)[None] if positions is None else positions
        rel = relative_inputs(cfg, emb, index, seq)

        @nnx.jit  # one compiled function: op-by-op gradients of this attention take seconds
        def out_and_grad(m, rel):
            def f(m):
                return m(x, bias, None, positions, rel).astype(jnp.float32).sum()
            return m(x, bias, None, positions, rel), nnx.grad(f)(m)

        with jax.default_matmul_precision("float32"):  # a GPU's default for f32 is TF32 (~1e-3)
            (ya, ga), (yb, gb) = out_and_grad(a, rel), out_and_grad(b, rel)
        ga, gb = nnx.state(ga), nnx.state(gb)
        if dtype == "float32":
            np.testing.assert_allclose(ya, yb, atol=2e-5)
            for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
                np.testing.assert_allclose(u, v, atol=5e-5 * max(1.0, float(np.abs(u).max())))
            continue
        assert _rel_err(ya, yb) < 2e-2
        _assert_grads_close(ga, gb, 1e-1)


def test_even_lengths_pads_without_changing_attention():
    """The padding cuDNN's kernels need (odd query and key lengths made even) leaves the attention of the real
    queries and its gradients unchanged: checked through XLA's implementation, on any backend."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), shape) for i, shape in
               enumerate([(2, 3, 4, 8), (2, 5, 4, 8), (2, 5, 4, 8)]))
    bias = jnp.where(jnp.arange(5)[None, None, None, :] < jnp.array([5, 3])[:, None, None, None], 0.0, -1e9)

    def attend(q, k, v, pad):
        qq, kk, vv, bb = even_lengths(q, k, v, bias) if pad else (q, k, v, bias)
        return jax.nn.dot_product_attention(qq, kk, vv, bias=bb)[:, :3]

    qp, kp, vp, bp = even_lengths(q, k, v, bias)
    assert qp.shape == (2, 4, 4, 8) and kp.shape == vp.shape == (2, 6, 4, 8) and bp.shape == (2, 1, 4, 6)
    np.testing.assert_allclose(attend(q, k, v, True), attend(q, k, v, False), atol=1e-6)
    loss = lambda pad: lambda *qkv: jnp.sum(jnp.sin(attend(*qkv, pad)))  # noqa: E731
    for g_pad, g in zip(jax.grad(loss(True), (0, 1, 2))(q, k, v), jax.grad(loss(False), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_pad, g, atol=1e-6)
    even = [q[:, :2], k[:, :4], v[:, :4]]
    assert all(a is b for a, b in zip(even_lengths(*even, bias[..., :4])[:3], even))  # nothing to pad


def test_cudnn_attention_needs_bfloat16_and_no_attention_dropout():
    with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype='bfloat16'"):
        EncoderConfig(vocab_size=10, attention="cudnn", attention_dropout=0.0)
    with pytest.raises(ValueError, match="model.attention='cudnn' has no attention dropout: set "
                                         "model.attention_dropout=0 \\(not 0.1\\)"):
        EncoderConfig(vocab_size=10, attention="cudnn", dtype="bfloat16")


def test_dot_product_attention_keeps_attention_dropout():
    """jax.nn.dot_product_attention has no dropout: with a key and a rate > 0 the einsum path runs."""
    a, b = _attention_pair(attention_dropout=0.5)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 32))
    bias = jnp.zeros((2, 1, 1, 8))
    key = jax.random.PRNGKey(3)
    np.testing.assert_allclose(a(x, bias, key), b(x, bias, key), rtol=1e-6)
    assert not np.allclose(b(x, bias, key), b(x, bias, None), atol=1e-3)  # dropout did happen


def test_bad_attention_name_is_refused():
    with pytest.raises(ValueError, match="model.attention='flash'"):
        EncoderConfig(vocab_size=10, attention="flash")


VOCAB = 97
SPEC = masking.MaskingSpec(vocab_size=VOCAB, mask_id=4, pad_id=0, special_ids=(0, 1, 2, 3, 4), max_predictions=6)


def _train_losses(dtype, steps=30):
    cfg = EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0, dtype=dtype)
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=3e-3, warmup_steps=0, total_steps=100))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model_fn = lambda: BertForMaskedLM(cfg, nnx.Rngs(0))  # noqa: E731
    layout = train_state.state_layout(model_fn, tx, mesh)
    state = train_state.create_state(model_fn, tx, mesh, layout, seed=0)
    step = train_step.make_train_step(layout, sharding.batch_sharding(mesh), tx=tx,
                                      objective=objectives.MlmObjective(SPEC))
    # Learnable rows (one repeated sequence), so the loss falls far within 30 steps.
    ids = np.tile(np.r_[2, np.arange(5, 27), 3].astype(np.int32), (16, 1))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    dtypes = {x.dtype for x in jax.tree.leaves(state.params)} | {x.dtype for x in jax.tree.leaves(state.opt_state)
                                                                  if hasattr(x, "dtype") and x.ndim}
    return np.array(losses), dtypes


@pytest.mark.slow
def test_bf16_compute_tracks_f32_and_keeps_f32_master_weights():
    f32, _ = _train_losses("float32")
    bf16, state_dtypes = _train_losses("bfloat16")
    assert state_dtypes == {jnp.dtype("float32")}  # master weights and Adam moments stay f32
    assert f32[-5:].mean() < 0.6 * f32[:5].mean()  # the run learns, so tracking it means something
    assert not np.array_equal(bf16, f32)  # the switch really computes in bf16
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per operation); the loss is a mean over
    # ~100 predictions, so its rounding noise averages down: measured max deviation 0.07% over these 30
    # steps. 2% leaves room for other CPUs/XLA versions and still catches a broken bf16 path (a wrong cast
    # or an overflow stalls or diverges, while the loss here falls by more than half: 25x that margin).
    np.testing.assert_allclose(bf16, f32, rtol=0.02)


def test_prefetch_keeps_order_and_transfers_ahead():
    put_calls = []

    def put(b):
        put_calls.append(b)
        return {"x": jnp.asarray(b)}

    it = prefetch.to_device(range(5), put, size=2)
    first = next(it)
    assert int(first["x"]) == 0 and put_calls == [0, 1]  # one batch already waiting on the device
    assert [int(b["x"]) for b in it] == [1, 2, 3, 4]
    assert list(prefetch.to_device([], put)) == []
    with pytest.raises(ValueError, match="prefetch size 0"):
        next(prefetch.to_device(range(3), put, size=0))


@pytest.mark.parametrize("width", [64, 33])
def test_dropout_rate_and_scale(width):
    """The 16-bit dropout masks: the dropped fraction is the rate, kept values are scaled to keep the mean,
    masks differ between keys and between the two halves of one random word."""
    from bert_jax.models.layers import dropout
    x = jnp.ones((256, width))
    y = dropout(x, 0.1, jax.random.PRNGKey(0))
    dropped = float((y == 0).mean())
    assert abs(dropped - 0.1) < 0.01, dropped  # 16k draws: the standard error is 0.0024
    np.testing.assert_allclose(float(y.mean()), 1.0, atol=0.02)
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 65536 / (65536 - 6554)], rtol=1e-6)
    assert not np.array_equal(y, dropout(x, 0.1, jax.random.PRNGKey(1)))
    if width % 2 == 0:
        assert not np.array_equal(y[:, 0::2] == 0, y[:, 1::2] == 0)
    assert dropout(x, 0.1, None) is x and dropout(x, 0.0, jax.random.PRNGKey(0)) is x


def test_attention_switch_reaches_the_model_config():
    from configs import bert
    config = bert.get_config("tiny")
    assert EncoderConfig.from_section(config.model, 100).attention == "einsum"
    config.unlock()
    config.model.attention = "dot_product"
    assert EncoderConfig.from_section(config.model, 100).attention == "dot_product"


@pytest.mark.parametrize("file, size, layers", [("bert", "base", 12), ("electra", "small", 12), ("bert", "large", 24),
                                               ("deberta", "xsmall", 12)])
def test_gpu_preset(file, size, layers):
    """`SIZE,gpu`: bf16, cuDNN attention (no attention dropout), the scan unrolled, tanh GELU, the kernels that
    measured faster; nothing else changes."""
    import importlib  # pylint: disable=import-outside-toplevel
    recipe = importlib.import_module(f"configs.{file}")
    plain, gpu = recipe.get_config(size), recipe.get_config(f"{size},gpu")
    cfg = EncoderConfig.from_section(gpu.model, 30522)
    assert (cfg.dtype, cfg.attention, cfg.attention_dropout, cfg.scan_unroll, cfg.hidden_act, cfg.kernels) == (
        "bfloat16", "cudnn", 0.0, layers, "gelu_tanh", ("gelu", "hash_dropout", "layernorm"))
    assert cfg.hidden_dropout == plain.model.hidden_dropout == 0.1
    plain_dict, gpu_dict = plain.to_dict(), gpu.to_dict()
    for key in ("dtype", "attention", "attention_dropout", "scan_unroll", "hidden_act", "kernels"):
        del plain_dict["model"][key], gpu_dict["model"][key]
    assert plain_dict == gpu_dict
    assert EncoderConfig.from_section(plain.model, 30522).attention == "einsum"
    with pytest.raises(ValueError, match="unknown preset 'tpu'"):
        recipe.get_config(f"{size},tpu")


@pytest.mark.slow
def test_remat_policies_give_the_same_loss_and_gradients():
    """remat none / full / dots change only what the backward pass stores, not the numbers (dropout on:
    the recomputed masks are the same draws)."""
    batch = {"input_ids": np.tile(np.r_[2, np.arange(5, 19), 3].astype(np.int32), (4, 1))}
    batch["attention_mask"] = np.ones_like(batch["input_ids"])
    batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    objective = objectives.MlmObjective(SPEC)
    masked = objective.corrupt(jax.random.PRNGKey(0), batch)
    norms = objective.normalizers(batch, masked)
    results = {}
    for remat in ("none", "full", "dots"):
        cfg = EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            max_position_embeddings=32, hidden_dropout=0.1, attention_dropout=0.1, remat=remat)
        with jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])), \
                nnx.logical_axis_rules(sharding.DEFAULT_RULES):
            graphdef, params = nnx.split(BertForMaskedLM(cfg, nnx.Rngs(0)))

        def loss(p, graphdef=graphdef):
            return objective.loss(nnx.merge(graphdef, p), batch, masked, jax.random.PRNGKey(1), norms)[0]

        results[remat] = jax.jit(jax.value_and_grad(loss))(params)
    for remat in ("full", "dots"):
        np.testing.assert_allclose(results[remat][0], results["none"][0], rtol=1e-6)
        for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(results[remat][1])[0],
                                jax.tree.leaves(results["none"][1])):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6, err_msg=f"{remat} {jax.tree_util.keystr(path)}")
