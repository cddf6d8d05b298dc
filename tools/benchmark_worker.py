"""The worker side of `tools.benchmark`: what one subprocess measures, printed as one `RESULT_JSON {...}` line.

    python -m tools.benchmark_worker '{"kind": "train", "size": "mini", ...}'

Kinds: `matmul` (the peak GFLOP/s a jitted square matmul reaches here), `train` (compile time, median step
time and peak RSS of one config), `ab` (two settings of one config in one process, timed alternately),
`compile` (compile time per size). Each worker builds the step through `bert_jax.builder.build_run`, exactly
as training does. Every worker runs in its own interpreter so that its peak RSS is its own.
"""

import json
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 30522  # bert-base-uncased's, as the peers use
CLS_ID, SEP_ID, MASK_ID, PAD_ID, UNK_ID = 101, 102, 103, 0, 100
FIRST_NORMAL_ID = 999
MATMUL_SIZES = {2048: 12, 4096: 5}  # size: repetitions
GPU_MATMUL_SIZES = {8192: 10}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak(sizes=None, dtype="float32") -> dict:
    """Best GFLOP/s of a jitted square matmul (random operands of `dtype`) per size; the peak is the best of
    all. On a GPU each repetition times 10 products back to back (one launch is ~1 ms there)."""
    import jax
    import jax.numpy as jnp
    gpu = jax.default_backend() == "gpu"
    sizes = sizes or (GPU_MATMUL_SIZES if gpu else MATMUL_SIZES)
    inner = 10 if gpu else 1
    out = {}
    for n, reps in sizes.items():
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
        f = jax.jit(lambda x, y: x @ y)
        f(a, b).block_until_ready()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                c = f(a, b)
            c.block_until_ready()
            best = min(best, (time.perf_counter() - t0) / inner)
        out[str(n)] = 2 * n ** 3 / best / 1e9
    return {"peak_gflops": max(out.values()), "per_size_gflops": out, "dtype": dtype,
            "device": str(jax.devices()[0].device_kind)}


def bench_config(spec: dict, overrides: dict):
    """The training config of one benchmark row: `configs/bert.py:SIZE` (its optimizer settings and document
    attention included) at vocabulary 30522, dropout 0.1, the row's sequence length, batch and objective
    (ELECTRA: the same model as discriminator, with the recipes' generator fraction), plus `overrides` of
    `model.*` keys (and `accum`: optim.grad_accum_steps). No evaluation; one device. A size `RECIPE:SIZE`
    (e.g. `deberta:base`) is `configs/RECIPE.py:SIZE` instead."""
    c = recipe_module(spec["size"]).get_config(spec["size"].rpartition(":")[2])
    c.model.vocab_size = VOCAB_SIZE
    c.model.max_position_embeddings = max(c.model.max_position_embeddings, spec["seq_len"])
    c.model.hidden_dropout = c.model.attention_dropout = 0.1
    for key, value in overrides.items():
        if key != "accum":
            c.model[key] = value
    c.objective.name = spec["objective"]
    c.objective.max_predictions = spec["max_predictions"]
    c.optim.grad_accum_steps = int(overrides.get("accum", 1))
    c.data.seq_len, c.train.batch_size, c.train.eval_every, c.mesh.data = spec["seq_len"], spec["batch"], 0, 1
    for section in ("optim", "train"):  # e.g. tools.kernel_benchmark's loss curves
        for key, value in spec.get(section, {}).items():
            c[section][key] = value
    return c


def recipe_module(size: str):
    """The recipe module of a benchmark size: configs.bert for `SIZE`, configs.RECIPE for `RECIPE:SIZE`."""
    import importlib

    return importlib.import_module(f"configs.{size.rpartition(':')[0] or 'bert'}")


def model_configs(size: str, seq_len: int, overrides: dict):
    """The EncoderConfig that a benchmark row of `size` trains (see `bench_config`)."""
    from bert_jax.models import EncoderConfig

    spec = {"size": size, "seq_len": seq_len, "batch": 1, "objective": "mlm", "max_predictions": 1}
    return EncoderConfig.from_section(bench_config(spec, overrides).model, VOCAB_SIZE)


def build_step(spec: dict, overrides: dict, abstract: bool = False):
    """The jitted training step exactly as training builds it (`bert_jax.builder.build_run`, on a synthetic
    manifest with BERT's special ids), its initial state and a few synthetic device batches (abstract: the
    shapes of both only, nothing allocated: enough to compile)."""
    import jax
    import numpy as np

    from bert_jax import builder, train_state
    from data_pipeline import manifest

    config = bench_config(spec, overrides)
    ids = manifest.SpecialIds(pad=PAD_ID, unk=UNK_ID, cls=CLS_ID, sep=SEP_ID, mask=MASK_ID)
    data = manifest.synthetic(spec["seq_len"], VOCAB_SIZE, ids)
    try:
        derived = builder.check_config(config, data, num_devices=1)
        run = builder.build_run(config, data, derived, devices=jax.devices()[:1])
    except builder.ConfigError as e:
        sys.exit(f"error: {e}")
    lower = run.call(run.step.lower)  # traced under the run's mesh and rules, as training runs it
    flops = _flops(run.model_cfg, run.generator_cfg, spec)
    if abstract:
        shape = jax.ShapeDtypeStruct((spec["batch"], spec["seq_len"]), np.int32, sharding=run.batch_sharding)
        names = ("input_ids", "attention_mask", "token_type_ids")
        return lower, run.layout.abstract, [{k: shape for k in names}], flops
    state = train_state.create_state(run.model_fn, run.tx, run.mesh, run.layout, config.train.seed, run.rules)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):  # one document per row: [CLS] random ordinary tokens [SEP], no padding
        ids = rng.integers(FIRST_NORMAL_ID, VOCAB_SIZE, (spec["batch"], spec["seq_len"]), dtype=np.int32)
        ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
        host = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        batches.append(jax.device_put(host, run.batch_sharding))
    return lower, state, batches, flops


def _flops(cfg, gen_cfg, spec) -> int:
    from bert_jax import flops
    predictions = min(spec["max_predictions"], spec["seq_len"])
    return flops.train_step_flops(cfg, spec["batch"], spec["seq_len"], predictions, generator=gen_cfg)


def _compile(lower, state, batch):
    """-> (the compiled step, seconds), from `build_step`'s lowering function."""
    t0 = time.perf_counter()
    compiled = lower(state, batch).compile()
    return compiled, time.perf_counter() - t0



def time_config(spec: dict) -> dict:
    """Compile time, median step time and peak RSS of one config."""
    import jax
    lower, state, batches, flops = build_step(spec, spec.get("overrides", {}))
    step, compile_s = _compile(lower, state, batches[0])
    times, metrics = [], None
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    median = statistics.median(times)
    tokens = spec["batch"] * spec["seq_len"]
    out = {"step_s": median, "step_s_min": min(times), "tokens_per_s": tokens / median,
           "sequences_per_s": spec["batch"] / median, "compile_s": compile_s, "flops_per_step": flops,
           "achieved_gflops": flops / median / 1e9, "peak_rss_mib": peak_rss_mib(), "last_loss": loss}
    if jax.default_backend() == "gpu":
        t0 = time.perf_counter()
        for i in range(spec["steps"]):
            state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        out["loop_step_s"] = (time.perf_counter() - t0) / spec["steps"]
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2 ** 20
    return out


def time_ab(spec: dict) -> dict:
    """The same config with each of two or more overrides in one process, timed in turn (A B C, C B A, ...);
    speedup_b_over_a = B's speed-up over A, speedup_over_first the same for every value. A value that fails
    to build or compile is reported in `errors` and left out, so one bad variant costs only itself."""
    import jax
    key, values = spec["ab_key"], spec["ab_values"]
    runs, errors = [], {}
    for value in values:
        try:
            lower, state, batches, _ = build_step(spec, {**spec.get("overrides", {}), key: value})
            step, compile_s = _compile(lower, state, batches[0])
            for _ in range(spec["warmup"]):
                state, m = step(state, batches[0])
            jax.block_until_ready(state)
        except Exception as e:  # pylint: disable=broad-except
            errors[str(value)] = f"{type(e).__name__}: {str(e)[:500]}"
            continue
        runs.append({"value": value, "step": step, "state": state, "batches": batches, "compile_s": compile_s,
                     "times": []})
    for i in range(spec["steps"]):
        for r in (runs if i % 2 == 0 else runs[::-1]):
            t0 = time.perf_counter()
            r["state"], m = r["step"](r["state"], r["batches"][i % len(r["batches"])])
            jax.block_until_ready((r["state"], m))
            r["times"].append(time.perf_counter() - t0)
            r["loss"] = m["loss"]
    med = {str(r["value"]): statistics.median(r["times"]) for r in runs}
    out = {"key": key, "values": values, "step_s": med,
           "compile_s": {str(r["value"]): r["compile_s"] for r in runs},
           "last_loss": {str(r["value"]): float(r["loss"]) for r in runs}}
    if errors:
        out["errors"] = errors
    if runs:
        first = med[str(values[0])] if str(values[0]) in med else None
        out["speedup_over_first"] = {v: first / t for v, t in med.items()} if first else {}
    if len(runs) == len(values):
        out["speedup_b_over_a"] = med[str(values[0])] / med[str(values[1])]
    return out


def time_compile(spec: dict) -> dict:
    """Compile time of the step for each size in spec['sizes'] (one process, same settings otherwise)."""
    out = {}
    for size in spec["sizes"]:
        lower, state, batches, _ = build_step({**spec, "size": size}, spec.get("overrides", {}), abstract=True)
        out[size] = _compile(lower, state, batches[0])[1]
        del lower, state, batches
    return {"compile_s": out}


WORKERS = {"matmul": lambda spec: matmul_peak({int(k): v for k, v in (spec.get("matmul_sizes") or {}).items()},
                                             dtype=spec["dtype"]), "train": time_config, "ab": time_ab,
           "compile": time_compile}


def run_worker(spec: dict) -> None:
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if spec.get("backend", "cpu") == "gpu":
        import jax
        try:
            found = jax.default_backend()
        except AssertionError:  # what jax raises when no platform of JAX_PLATFORMS can start
            found = None
        if found != "gpu":
            sys.exit(f"no GPU visible to jax {jax.__version__} (JAX_PLATFORMS=cuda: is its CUDA plugin installed, "
                     "a GPU visible?)")
    result = WORKERS[spec["kind"]](spec)
    print("RESULT_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]))
