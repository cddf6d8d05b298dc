#!/usr/bin/env bash
# The GPU figures of the performance issue, in one run on one GPU (about 8 minutes on an H100):
#   1. cuDNN's fused attention computes what the einsum path does (values and gradients, bfloat16);
#   2. BERT-base and BERT-large, seq 128, batch 256, with the settings of the `SIZE,gpu` preset (bf16, cuDNN
#      attention without attention dropout, the layer scan unrolled, GELU's tanh approximation): tokens/s,
#      sequences/s (NVIDIA publishes 580 per A100-80GB for its PyTorch BERT-large pretraining phase 1) and
#      MFU against the measured bf16 matmul peak and the datasheet's dense bf16 peak (PEAK_TFLOPS, default an
#      H100 SXM's 989.4); on base also an A/B of the exact GELU against the tanh one;
#   3. BERT-base as the CPU recipes run it, only in bf16 (einsum attention with attention dropout 0.1);
#   4. BERT-base with the preset at batch 512, and at seq 512 (batch 64).
# The preset's other means were each measured by an A/B (docs/BENCHMARKS.md), e.g. --ab scan_unroll=1,12.
# Usage: OUT=/some/dir bash tools/gpu_benchmark.sh   (logs and the benchmarks' JSON lines land in $OUT)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bert_jax_gpu}
PEAK_TFLOPS=${PEAK_TFLOPS:-989.4}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
  | tee -a "$OUT/gpu.txt"

# (only the attention tests: the CLI tests there expect the CPU backend that JAX_PLATFORMS=cuda takes away)
JAX_PLATFORMS=cuda timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_benchmark.py \
  -k "fused_attention or cudnn_attention or even_lengths" 2>&1 | tail -5 | tee "$OUT/attention_test.txt"

bench() {  # name, then the benchmark's arguments
  local name=$1; shift
  timeout 400 $PY -m tools.benchmark --backend gpu --seq-len 128 --steps 20 --warmup 3 --peak-tflops "$PEAK_TFLOPS" \
    --model dtype=bfloat16 "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^{'
}
PRESET=(--model attention=cudnn --model attention_dropout=0 --model scan_unroll=24 --model hidden_act=gelu_tanh)
bench base_large_preset_b256 --configs base,large --batch-size 256 "${PRESET[@]}" --ab hidden_act=gelu,gelu_tanh
bench base_einsum_b256 --configs base --batch-size 256
bench base_preset_b512 --configs base --batch-size 512 "${PRESET[@]}"
bench base_preset_s512 --configs base --batch-size 64 --seq-len 512 "${PRESET[@]}"
