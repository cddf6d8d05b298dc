"""The Pallas kernels on a GPU: each alone against the XLA code it replaces, and loss curves with and without.

    python -m tools.kernel_benchmark --part ops       # forward + backward of each kernel, one process
    python -m tools.kernel_benchmark --part curve --size base --batch 64 --steps 500 \\
        --kernels hash_dropout+layernorm+gelu --data rows.npy

ops: at BERT-base's shapes (tokens = batch 256 x seq 128, hidden 768, MLP 3072, bfloat16), jitted
forward + backward of (a) residual + dropout + LayerNorm: the kernel, the same math in XLA with hash masks,
and the model's plain path (threefry masks); (b) bias + GELU (tanh and exact): the kernel against XLA; and
(c) one AdamW update with clipping over BERT-base's parameters: the kernel against optax. Each timing is the
median over rounds of 10 back-to-back calls, the variants of a kernel timed alternately; ratios are plain
over fused (> 1: the kernel is faster).
curve: the `SIZE,gpu` preset trained `--steps` steps from the same initial weights on the same batches
(`--data`: an int32 [rows, seq] .npy of token ids with bert-base-uncased's special ids, e.g. from
`--export-rows`; else random tokens), once without kernels (or with `--baseline`'s) and once with `--kernels`; the mean train loss per
50 steps of each and their relative difference. The kernels draw hash dropout masks, the plain path threefry
ones: the curves agree in distribution, not bitwise.
The last line printed is one JSON object.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(fns: dict, args: dict, rounds: int, inner: int = 10) -> dict:
    """{name: median seconds per call}, the functions timed alternately (warm-up and compile first)."""
    import jax
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fn(*args[name])
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def _fwd_bwd(fn):
    import jax
    return jax.jit(lambda args, cot: jax.vjp(fn, *args)[1](cot))


def ops(args) -> dict:
    import jax
    import jax.numpy as jnp
    from bert_jax.kernels import gelu, hash_dropout, layernorm
    from bert_jax.models import layers

    dt = jnp.dtype(args.dtype)
    k = jax.random.split(jax.random.key(0), 6)
    n, h, m = args.rows, args.hidden, args.mlp
    x, res = (jax.random.normal(k[i], (n, h)).astype(dt) for i in (0, 1))
    scale, bias = jnp.ones(h), jnp.zeros(h)
    key, rate = jax.random.key(1), 0.1
    out = {"shapes": {"rows": n, "hidden": h, "mlp": m, "dtype": args.dtype}}

    def plain_ln(x, res, scale, bias):  # the model's path without kernels: threefry dropout, XLA LayerNorm
        z = (res + layers.dropout(x, rate, key)).astype(jnp.float32)
        mean = z.mean(-1, keepdims=True)
        var = jnp.square(z - mean).mean(-1, keepdims=True)
        return ((z - mean) * jax.lax.rsqrt(var + 1e-12) * scale + bias).astype(dt)

    ln_args = ((x, res, scale, bias), x)
    t = _timed({"kernel": _fwd_bwd(lambda *a: layernorm.residual_dropout_layernorm(*a, key, rate=rate, eps=1e-12)),
                "xla_hash": _fwd_bwd(lambda *a: layernorm.reference(*a, key, rate=rate, eps=1e-12)),
                "xla_threefry": _fwd_bwd(plain_ln)}, {name: ln_args for name in
                                                      ("kernel", "xla_hash", "xla_threefry")}, args.rounds)
    out["layernorm"] = {"ms": {k_: v * 1e3 for k_, v in t.items()},
                        "speedup_vs_xla_hash": t["xla_hash"] / t["kernel"],
                        "speedup_vs_xla_threefry": t["xla_threefry"] / t["kernel"],
                        "hash_vs_threefry_in_xla": t["xla_threefry"] / t["xla_hash"]}
    hm = jax.random.normal(k[2], (n, m)).astype(dt)
    gb = jnp.zeros(m)
    for approximate in (True, False):
        name = "gelu_tanh" if approximate else "gelu"
        fns = {"kernel": _fwd_bwd(lambda h, b: gelu.bias_gelu_dropout(h, b, approximate=approximate)),
               "xla": _fwd_bwd(lambda h, b: gelu.reference(h, b, approximate=approximate))}
        t = _timed(fns, {name_: ((hm, gb), hm) for name_ in fns}, args.rounds)
        out[name] = {"ms": {k_: v * 1e3 for k_, v in t.items()}, "speedup": t["xla"] / t["kernel"]}
    out["hash_dropout_alone"] = _dropout_alone(x, key, rate, args.rounds, hash_dropout, layers)
    out["adamw"] = _adamw(args.rounds, args.adamw_size)
    return out


def _dropout_alone(x, key, rate, rounds, hash_dropout, layers) -> dict:
    fns = {"hash": _fwd_bwd(lambda x: hash_dropout.dropout(x, rate, key)),
           "threefry": _fwd_bwd(lambda x: layers.dropout(x, rate, key))}
    t = _timed(fns, {name: ((x,), x) for name in fns}, rounds)
    return {"ms": {k: v * 1e3 for k, v in t.items()}, "speedup": t["threefry"] / t["hash"]}


def _adamw(rounds: int, size: str) -> dict:
    """One update over the parameters of BERT-`size` (f32), optax's chain against the kernel."""
    import jax
    from flax import nnx
    from bert_jax import optim, sharding
    from bert_jax.models import BertForMaskedLM, EncoderConfig

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    from configs import common
    layers, hidden, heads, mlp = common.SIZES[size]
    cfg = EncoderConfig(vocab_size=30522, num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=mlp)
    model_fn = lambda: BertForMaskedLM(cfg, nnx.Rngs(0))  # noqa: E731
    params = sharding.init_params(model_fn, mesh, sharding.abstract_params(model_fn, mesh)[2])
    grads = jax.tree.map(lambda p: 1e-3 * jax.numpy.ones_like(p), params)
    c = optim.OptimConfig(learning_rate=1e-4, warmup_steps=10, total_steps=1000)
    out = {"parameters": sum(p.size for p in jax.tree.leaves(params))}
    fns, fargs = {}, {}
    for name, fused in (("optax", False), ("kernel", True)):
        tx = optim.make_optimizer(c, fused=fused)

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax_apply(p, u), s

        fns[name] = jax.jit(step)
        fargs[name] = (params, tx.init(params), grads)
    t = _timed(fns, fargs, rounds)
    out.update({"ms": {k: v * 1e3 for k, v in t.items()}, "speedup": t["optax"] / t["kernel"]})
    return out


def optax_apply(p, u):
    import optax
    return optax.apply_updates(p, u)


def curve(args) -> dict:
    import jax
    import numpy as np
    sys.path.insert(0, ROOT)
    from configs import common
    from tools import benchmark_worker as bw

    preset = {"dtype": "bfloat16", "attention": "cudnn" if jax.default_backend() == "gpu" else "einsum",
              "attention_dropout": 0.0, "hidden_act": "gelu_tanh",
              "scan_unroll": common.SIZES[args.size][0]}
    spec = {"size": args.size, "seq_len": args.seq_len, "batch": args.batch, "objective": "mlm",
            "max_predictions": -(-15 * args.seq_len // 100),
            "optim": {"learning_rate": args.lr, "warmup_steps": args.warmup, "b2": 0.98},
            "train": {"steps": args.steps}}
    rows = np.load(args.data) if args.data else None
    rng = np.random.default_rng(0)
    batches = []
    for i in range(args.steps):
        if rows is not None:
            ids = rows[(np.arange(args.batch) + i * args.batch) % len(rows)]
        else:
            ids = rng.integers(bw.FIRST_NORMAL_ID, bw.VOCAB_SIZE, (args.batch, args.seq_len), dtype=np.int32)
            ids[:, 0], ids[:, -1] = bw.CLS_ID, bw.SEP_ID
        batches.append({"input_ids": ids.astype(np.int32), "attention_mask": (ids != bw.PAD_ID).astype(np.int32),
                        "token_type_ids": np.zeros_like(ids, dtype=np.int32)})
    out = {"settings": {**spec, "kernels": args.kernels, "baseline": args.baseline or "none",
                        "data": args.data or "random tokens"}}
    for name, kernels in (("plain", args.baseline), ("kernels", args.kernels)):
        lower, state, dev_batches, _ = bw.build_step(spec, {**preset, "kernels": kernels})
        step = lower(state, dev_batches[0]).compile()
        sharding = dev_batches[0]["input_ids"].sharding
        losses = []
        t0 = time.perf_counter()
        for b in batches:
            state, metrics = step(state, jax.device_put(b, sharding))
            losses.append(metrics["loss"])
        losses = [float(v) for v in jax.device_get(losses)]
        out[name] = {"seconds": time.perf_counter() - t0,
                     "loss_per_50": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)]}
        del state, step
    a, b = out["plain"]["loss_per_50"], out["kernels"]["loss_per_50"]
    out["relative_difference_per_50"] = [(y - x) / x for x, y in zip(a, b)]
    out["max_abs_relative_difference"] = max(abs(d) for d in out["relative_difference_per_50"])
    return out


def export_rows(args) -> None:
    """--export-rows OUT.npy --data-dir SHARDS: the train split of pretokenized shards as int32 [rows, seq]."""
    import numpy as np
    from data_pipeline import dataset
    ds = dataset.make_dataset(args.data_dir, "train", 64, shuffle=False, repeat=False, drop_remainder=False)
    rows = np.concatenate([b["input_ids"] for b in dataset.as_numpy(ds)]).astype(np.int32)
    np.save(args.export_rows, rows)
    print(f"{rows.shape[0]} rows of {rows.shape[1]} tokens -> {args.export_rows}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.kernel_benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("ops", "curve"), default="ops")
    ap.add_argument("--rows", type=int, default=256 * 128)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--mlp", type=int, default=3072)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--adamw-size", default="base", help="the model whose parameters the AdamW A/B updates")
    ap.add_argument("--size", default="base")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--kernels", default="hash_dropout+layernorm+gelu")
    ap.add_argument("--baseline", default="", help="the kernels of the curve's baseline run (default none; e.g. "
                    "hash_dropout: XLA with the kernels' masks)")
    ap.add_argument("--data", default="", help="int32 [rows, seq] .npy of token ids (curve)")
    ap.add_argument("--export-rows", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.export_rows:
        return export_rows(args)
    if args.steps < 50:
        sys.exit(f"error: --steps={args.steps} must be >= 50 (the curve is compared per 50 steps)")
    sys.path.insert(0, ROOT)
    import jax
    result = {"part": args.part, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    result.update(ops(args) if args.part == "ops" else curve(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
