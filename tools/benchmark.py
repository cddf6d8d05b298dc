"""Training throughput and MFU of the real training step: `python -m tools.benchmark --configs mini,small,medium`.

What is timed is exactly what `bert_jax.training` runs: the step that `bert_jax.builder.build_run` builds from
`configs/bert.py:SIZE` (objective MLM or ELECTRA with masking on device, document attention, the recipe's
optimizer settings, the state donated), at dropout 0.1, on a synthetic manifest (nothing is read). The inputs are synthetic (random token ids, [CLS] ... [SEP], no padding; vocabulary 30522, as the peer
benchmark in shared/bench uses), placed on the device before timing, so no data loading is measured. Each
step is timed to `block_until_ready` after `--warmup` untimed steps (the first compiles); the figure is the
median. Every config runs in its own subprocess, so its peak RSS is its own.

MFU = bert_jax.flops.train_step_flops (printed: bert_jax.flops.FORMULA) / median step time / the matmul peak
that XLA reaches on this machine, measured by this tool in the same invocation (a jitted square matmul in the
model's compute dtype, f32 unless --model dtype=bfloat16; 2048 and 4096 on a CPU, 8192 on a GPU; best of
several repetitions, in its own subprocess). --peak-tflops adds MFU against a datasheet peak (an H100 SXM's
dense bf16: 989.4).

On a GPU (--backend gpu): the same, plus the device's peak memory, and the mean step time of the timed steps
run back to back with one synchronisation at the end (as training runs: no host sync per step). For the
fastest GPU step measured (the `SIZE,gpu` preset's settings): --model dtype=bfloat16 --model attention=cudnn
--model attention_dropout=0 --model scan_unroll=<layers> --model hidden_act=gelu_tanh (cuDNN's fused
attention has no dropout).

Other modes:
  --grid            tokens/s of `small` for seq 128/512 x batch 32/128 (how cost grows)
  --ab KEY=A,B      one process, one config: the step with model.KEY=A against KEY=B (or more values), timed
                    in turn, reported as ratios of medians; e.g. --ab attention=einsum,dot_product,
                    --ab dtype=float32,bfloat16, --ab remat=none,full, --ab last_layer=all,predictions,
                    --ab scan_unroll=1,12, --ab hidden_act=gelu,gelu_tanh,
                    --ab accum=1,2, --ab kernels=none,hash_dropout,layernorm+gelu (GPU)
  --compile-ratio   compile time of large against base (layers under scan: depth should barely matter)
  --peers           after each config runs shared/bench/peer_throughput.py on it (needs its venv: bash
                    setup_peers.sh) and prints our tokens/s over the faster peer's; --rounds N repeats the
                    pair N times in turn and reports the median ratio (the machine's speed drifts)

The last stdout line is one JSON object with every figure.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

from tools.benchmark_worker import ROOT, model_configs, recipe_module

GRID = [(128, 32), (128, 128), (512, 32), (512, 128)]  # (seq_len, batch) on small
DEFAULT_PEER_SCRIPT = "/work/shared/bench/peer_throughput.py"
DEFAULT_PEER_PYTHON = os.path.expanduser("~/.cache/bert-jax-peers/bin/python")
PEER_CONFIGS = ("mini", "small", "medium")  # what peer_throughput.py runs at batch 32 (its RUNS)
AB_KEYS = ("attention", "dtype", "remat", "last_layer", "scan_unroll", "accum", "attention_dropout",
           "hidden_dropout", "hidden_act", "kernels")


# ----------------------------------------------------------------------------------------------- driver
def spawn(spec: dict, timeout: float) -> dict:
    """Runs one worker in a fresh interpreter; its result, or {'error': ...}."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[spec.get("backend", "cpu")]
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        p = subprocess.run([sys.executable, "-m", "tools.benchmark_worker", json.dumps(spec)], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT_JSON "):
            return json.loads(line[len("RESULT_JSON "):])
    return {"error": f"worker exit {p.returncode}: {error_line(p.stderr)}"}


def error_line(stderr: str) -> str:
    """The line of a worker's stderr that says what failed: the last `SomeError: ...` line (a traceback's
    last line is often a note, e.g. JAX's about its filtered frames), else the last line."""
    lines = stderr.strip().splitlines() or ["no output"]
    for line in reversed(lines):
        if re.match(r"[\w.]*(Error|Exception|Exit)\b", line):
            return line.strip()
    return lines[-1]


def log(msg: str) -> None:
    print(msg, flush=True)


def ours_and_peers(args, configs: list[str], spec_for, train) -> tuple[dict, dict]:
    """--peers: per config, ours then the peers right after, `--rounds` times in turn, so that both sides of
    a ratio are measured minutes apart (this machine's speed drifts by tens of percent over an hour).
    -> ({config: our first round's figures + per-round and median ratios}, {config: peers of each round})."""
    ours_out, peers_out, error = {}, {}, None
    for i in range(args.rounds):
        for c in configs:
            label = f"{c} b{args.batch_size} s{args.seq_len}" + (f" (round {i + 1})" if args.rounds > 1 else "")
            ours = train(spec_for(c), label)
            first = ours_out.setdefault(c, ours)
            peers = {} if error else run_peers(args, [c])
            if "error" in peers:
                error = peers
                log(f"peers: ERROR {peers['error']}")
            if error:
                continue
            theirs = peers.get(c, {})
            peers_out.setdefault(c, []).append(theirs)
            if theirs and "tokens_per_s" in ours:
                fastest = max(v["tokens_per_s"] for v in theirs.values())
                first.setdefault("tokens_per_s_rounds", []).append(ours["tokens_per_s"])
                first.setdefault("vs_faster_peer_rounds", []).append(ours["tokens_per_s"] / fastest)
                first["vs_faster_peer"] = statistics.median(first["vs_faster_peer_rounds"])
                first["rss_vs_peers_min"] = ours["peak_rss_mib"] / min(v["peak_rss_mib"] for v in theirs.values())
                log(f"{c}: {ours['tokens_per_s'] / fastest:.2f}x the faster peer's tokens/s ({fastest:.0f}); "
                    f"peak RSS {first['rss_vs_peers_min']:.2f}x the smaller peer's")
        if error:
            break
    for c, first in ours_out.items():
        if len(first.get("vs_faster_peer_rounds", [])) > 1:
            log(f"{c}: median over {args.rounds} rounds {first['vs_faster_peer']:.2f}x the faster peer "
                f"({', '.join(f'{x:.2f}' for x in first['vs_faster_peer_rounds'])})")
    return ours_out, error or peers_out


def run_peers(args, configs: list[str]) -> dict:
    """shared/bench/peer_throughput.py on the same configs (its own venv); {config: faster peer's tokens/s}."""
    if not os.path.exists(args.peer_python):
        return {"error": f"peer venv not found at {args.peer_python}: run `bash {os.path.dirname(args.peer_script)}"
                         f"/setup_peers.sh` first (or pass --peer-python)"}
    configs = [c for c in configs if c in PEER_CONFIGS]
    if not configs:
        return {"error": f"the peer benchmark knows only {PEER_CONFIGS}"}
    if (args.batch_size, args.seq_len) != (32, 128):
        log("note: the peers always run batch 32, seq 128; compare only runs of those shapes")
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, "peers.json")
    cmd = [args.peer_python, args.peer_script, "--configs", ",".join(configs), "--out", out, "--no-matmul",
           "--rounds", str(args.peer_rounds)]
    log("peers: " + " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0 or not os.path.exists(out):
        return {"error": f"peer_throughput.py exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}"}
    with open(out, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    best = {}
    for r in rows:
        if "tokens_per_s" in r:
            entry = best.setdefault(r["run"], {})
            entry[r["peer"]] = {"tokens_per_s": r["tokens_per_s"], "peak_rss_mib": r["peak_rss_mib"]}
    return best


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="mini,small,medium",
                    help="comma list of sizes from configs/common.py SIZES (default: %(default)s), or of DeBERTa "
                    "recipes as deberta:SIZE (configs/deberta.py); '' for none")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--objective", choices=("mlm", "electra", "deberta_rtd"), default="mlm",
                    help="deberta_rtd: DeBERTa-v3's RTD, with deberta:SIZE configs")
    ap.add_argument("--max-predictions", type=int, default=-1,
                    help="prediction slots per row; -1: ceil(0.15 x seq_len) (20 at seq 128, as the configs)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per config (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    ap.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override for every run, KEY in {AB_KEYS} (accum: micro-batches per step; repeatable)")
    ap.add_argument("--grid", action="store_true", help="also small at seq 128/512 x batch 32/128")
    ap.add_argument("--ab", action="append", default=[], metavar="KEY=A,B",
                    help=f"A/B ratio in one process for KEY in {AB_KEYS} on the first config or mini (repeatable)")
    ap.add_argument("--ab-config", default="", help="the size the A/Bs run (default: the first of --configs, or mini)")
    ap.add_argument("--compile-ratio", action="store_true", help="compile time of large vs base")
    ap.add_argument("--peers", action="store_true",
                    help="after each config, shared/bench/peer_throughput.py on it (tokens/s ratio to the faster peer)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --peers: measure ours and the peers in turn this many times; median ratio reported")
    ap.add_argument("--peer-script", default=DEFAULT_PEER_SCRIPT)
    ap.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
    ap.add_argument("--peer-rounds", type=int, default=1)
    ap.add_argument("--backend", choices=("cpu", "gpu"), default="cpu", help="where the workers run")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="also report MFU against this datasheet peak (e.g. 989.4: an H100 SXM's dense bf16)")
    ap.add_argument("--out-dir", default="/tmp/bert_jax_benchmark", help="where --peers writes its JSON")
    ap.add_argument("--matmul-size", type=int, action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    return ap.parse_args(argv)


def _overrides(items: list[str], ap_error) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in AB_KEYS:
            ap_error(f"--model {item!r}: expected KEY=VALUE with KEY in {AB_KEYS}")
        try:
            out[key] = _typed(key, value)
        except ValueError:
            ap_error(f"--model {item!r}: {value!r} is not a number")
    return out


def _typed(key: str, value: str):
    """accum and scan_unroll are ints, the dropout rates floats, the rest strings (EncoderConfig checks them)."""
    if key in ("accum", "scan_unroll", "position_buckets", "max_relative_positions"):
        return int(value)
    return float(value) if key.endswith("dropout") else value


def _check_size(c: str, flag: str, fail) -> None:
    """SIZE (configs/bert.py) or deberta:SIZE; else `fail` with one line."""
    from configs import common
    recipe, _, size = c.rpartition(":")
    if recipe not in ("", "bert", "deberta"):
        fail(f"{flag}: unknown recipe {recipe!r} in {c!r}; SIZE (configs/bert.py) or deberta:SIZE")
    sizes = recipe_module(c).SIZES if recipe == "deberta" else common.SIZES
    if size not in sizes:
        fail(f"{flag}: unknown size {size!r}; choose from {sorted(sizes)}")


def check_args(args) -> tuple[list[str], dict, list]:
    """Validates everything before any subprocess runs; exits with one `error:` line."""
    def fail(msg):
        sys.exit(f"error: {msg}")

    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        _check_size(c, "--configs", fail)
    if args.ab_config:
        _check_size(args.ab_config, "--ab-config", fail)
    for key, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--steps", args.steps),
                       ("--rounds", args.rounds)):
        if value < 1:
            fail(f"{key}={value} must be >= 1")
    if args.warmup < 1:
        fail(f"--warmup={args.warmup} must be >= 1")
    overrides = _overrides(args.model, fail)
    try:  # the overrides' values, checked here rather than in a worker after minutes of work
        model_configs("tiny", args.seq_len, overrides)
    except ValueError as e:
        fail(f"--model: {e}")
    abs_ = []
    for item in args.ab:
        key, sep, values = item.partition("=")
        vals = values.split(",")
        if not sep or key not in AB_KEYS or len(vals) < 2:
            fail(f"--ab {item!r}: expected KEY=A,B[,C...] with KEY in {AB_KEYS}")
        abs_.append((key, [_typed(key, v) for v in vals]))
    return configs, overrides, abs_


def main(argv=None) -> None:
    args = parse_args(argv)
    configs, overrides, abs_ = check_args(args)
    sys.path.insert(0, ROOT)
    from bert_jax import flops

    def spec_for(size, seq_len=args.seq_len, batch=args.batch_size, **kw):
        preds = args.max_predictions if args.max_predictions > 0 else -(-15 * seq_len // 100)
        return {"size": size, "seq_len": seq_len, "batch": batch, "max_predictions": preds,
                "objective": args.objective, "backend": args.backend, "steps": args.steps, "warmup": args.warmup,
                "overrides": overrides, **kw}

    matmul_sizes = {n: 3 for n in args.matmul_size} or None
    log(f"FLOPs formula (bert_jax.flops.FORMULA): {flops.FORMULA}")
    log("inputs: synthetic random token batches (vocab 30522, [CLS] ... [SEP], no padding), on device before "
        f"timing; objective {args.objective}, AdamW, dropout 0.1, f32 params")
    result = {"settings": {"batch_size": args.batch_size, "seq_len": args.seq_len, "objective": args.objective,
                           "backend": args.backend, "peak_tflops": args.peak_tflops,
                           "steps": args.steps, "warmup": args.warmup, "overrides": overrides,
                           "formula": flops.FORMULA, "inputs": "synthetic"},
              "machine": {"nproc": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    dtype = model_configs("tiny", args.seq_len, overrides).dtype  # the recipes' default unless overridden
    mm = spawn({"kind": "matmul", "matmul_sizes": matmul_sizes, "dtype": dtype, "backend": args.backend},
               args.timeout)
    if "error" in mm and args.backend != "cpu":  # no such device here: every worker would fail the same way
        sys.exit(f"error: --backend {args.backend}: {mm['error']}")
    peak = mm.get("peak_gflops")
    result["matmul"] = mm
    log(f"matmul peak (jitted {dtype}, XLA, {mm.get('device')}): {peak and round(peak, 1)} GFLOP/s "
        f"{mm.get('per_size_gflops', mm)}")

    def train(spec, label):
        r = spawn({"kind": "train", **spec}, args.timeout)
        if "error" not in r and peak:
            r["mfu"] = r["achieved_gflops"] / peak
        if "error" not in r and args.peak_tflops:
            r["mfu_datasheet"] = r["achieved_gflops"] / (1e3 * args.peak_tflops)
        r.update({k: spec[k] for k in ("size", "seq_len", "batch", "max_predictions")})
        if "error" in r:
            log(f"{label}: ERROR {r['error']}")
        else:
            log(f"{label}: step {r['step_s'] * 1e3:.1f} ms (median of {args.steps}), {r['tokens_per_s']:.0f} "
                f"tokens/s, compile {r['compile_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                f"{r['flops_per_step'] / 1e9:.1f} GFLOP/step, {r['achieved_gflops']:.1f} GFLOP/s, "
                f"MFU {100 * r.get('mfu', float('nan')):.1f}%")
            if "loop_step_s" in r:
                log(f"{label}: {r['sequences_per_s']:.1f} sequences/s; back to back "
                    f"{r['loop_step_s'] * 1e3:.1f} ms/step, device peak memory "
                    f"{r.get('device_peak_mib', float('nan')):.0f} MiB")
            if "mfu_datasheet" in r:
                log(f"{label}: MFU against the {args.peak_tflops} TFLOP/s datasheet peak "
                    f"{100 * r['mfu_datasheet']:.1f}%")
        return r

    if args.peers:
        result["configs"], result["peers"] = ours_and_peers(args, configs, spec_for, train)
    else:
        result["configs"] = {c: train(spec_for(c), f"{c} b{args.batch_size} s{args.seq_len}") for c in configs}
    if args.grid:
        result["grid"] = {f"small_s{s}_b{b}": train(spec_for("small", s, b), f"grid small b{b} s{s}")
                          for s, b in GRID}
    if abs_:
        result["ab"] = {}
        for key, vals in abs_:
            ab_size = args.ab_config or (configs[0] if configs else "mini")
            r = spawn({"kind": "ab", "ab_key": key, "ab_values": vals, **spec_for(ab_size)}, args.timeout)
            result["ab"][f"{key}={','.join(map(str, vals))}"] = r
            if "error" in r:
                log(f"A/B {key}: ERROR {r['error']}")
                continue
            for v, err in r.get("errors", {}).items():
                log(f"A/B {ab_size} {key}={v}: ERROR {err}")
            for v, t in r["step_s"].items():
                log(f"A/B {ab_size} {key}={v}: {t * 1e3:.1f} ms, {r['speedup_over_first'].get(v, float('nan')):.3f}x "
                    f"as fast as {key}={vals[0]}")
    if args.compile_ratio:
        r = spawn({"kind": "compile", "sizes": ["base", "large"], **spec_for("base")}, args.timeout)
        if "error" not in r:
            r["large_over_base"] = r["compile_s"]["large"] / r["compile_s"]["base"]
            log(f"compile time: base {r['compile_s']['base']:.1f} s, large {r['compile_s']['large']:.1f} s, "
                f"ratio {r['large_over_base']:.2f}")
        result["compile_ratio"] = r
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
