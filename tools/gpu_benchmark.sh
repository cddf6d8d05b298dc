#!/usr/bin/env bash
# The GPU figures of the performance issue, in one run on one GPU (about 8 minutes on an H100):
#   1. cuDNN's fused attention computes what the einsum path does (values and gradients, bfloat16);
#   2. BERT-base and BERT-large, seq 128, batch 256, with the settings of the `SIZE,gpu` preset (bf16, cuDNN
#      attention without attention dropout, the layer scan unrolled, GELU's tanh approximation, the Pallas
#      kernels hash_dropout+layernorm+gelu): tokens/s,
#      sequences/s (NVIDIA publishes 580 per A100-80GB for its PyTorch BERT-large pretraining phase 1) and
#      MFU against the measured bf16 matmul peak and the datasheet's dense bf16 peak (PEAK_TFLOPS, default an
#      H100 SXM's 989.4); on base also an A/B of the exact GELU against the tanh one;
#   3. BERT-base as the CPU recipes run it, only in bf16 (einsum attention with attention dropout 0.1);
#   4. BERT-base with the preset at batch 512, and at seq 512 (batch 64).
# The preset's other means were each measured by an A/B (docs/BENCHMARKS.md), e.g. --ab scan_unroll=1,12.
# Usage: OUT=/some/dir bash tools/gpu_benchmark.sh   (logs and the benchmarks' JSON lines land in $OUT)
#
# `bash tools/gpu_benchmark.sh kernels` runs the Pallas kernels' part instead (about 8 minutes on an H200):
#   K1. tests/test_kernels.py on the GPU (Triton-compiled kernels against their XLA references);
#   K2. each kernel alone, forward + backward, against the XLA code it replaces (tools.kernel_benchmark);
#   K3. the whole step, BERT-base seq 128 batch 256, the preset with each set of kernels (one process);
#   K4. BERT-large batch 256 and BERT-base batch 512, the preset with and without $BEST_KERNELS;
#   K5. a 500-step bf16 loss curve of BERT-base (batch 64) with and without $BEST_KERNELS, on the token rows
#       in .gpu_data/rows.npy when present (tools.kernel_benchmark --export-rows writes them), else random.
# PARTS (default "K1 K2 K3 K4 K5") picks parts; the last line is one JSON object of everything measured.
#
# `bash tools/gpu_benchmark.sh deberta` runs DeBERTa's part (about 6 minutes on an H200):
#   D1. the fused-attention tests on the GPU, DeBERTa's relative terms as cuDNN's bias among them;
#   D2. DeBERTa-v3 RTD (configs/deberta.py base and large), seq 128, batch 256, the `SIZE,gpu` preset: MFU;
#   D3. DeBERTa MLM on the base backbone, the preset, A/B of its attention: einsum against cuDNN with the
#       relative terms as its bias (one process);
#   D4. BERT-base with the preset in the same session, the figure the DeBERTa rows are read against.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bert_jax_gpu}
PEAK_TFLOPS=${PEAK_TFLOPS:-989.4}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

summary() {  # one JSON object: each log's last JSON line, and the last line of the tests' output ($1.txt)
  $PY - "$OUT" "$1" <<'PYEOF'
import glob, json, os, sys
out = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.log"))):
    lines = [l for l in open(path) if l.startswith("{")]
    if lines:
        out[os.path.basename(path)[:-4]] = json.loads(lines[-1])
tests = os.path.join(sys.argv[1], sys.argv[2] + ".txt")
if os.path.exists(tests):
    out[sys.argv[2]] = open(tests).read().strip().splitlines()[-1:]
print(json.dumps(out))
PYEOF
}

kernels() {
  local parts=${PARTS:-K1 K2 K3 K4 K5} best=${BEST_KERNELS:-hash_dropout+layernorm+gelu}
  local K3_SETS=${K3_SETS:-none,hash_dropout,hash_dropout+layernorm,hash_dropout+gelu,hash_dropout+layernorm+gelu,hash_dropout+layernorm+gelu+adamw}
  local data=""; [ -f .gpu_data/rows.npy ] && data=.gpu_data/rows.npy
  if [[ $parts == *K1* ]]; then  # in the CPU suite only: the sharded test (8 devices), the training one (tf.data)
    JAX_PLATFORMS=cuda timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py \
      -k "not sharded and not training_steps" 2>&1 \
      | tail -15 | tee "$OUT/kernel_tests.txt"
  fi
  [[ $parts == *K2* ]] && timeout 300 $PY -m tools.kernel_benchmark --part ops 2>&1 | tee "$OUT/kernel_ops.log" | tail -1
  [[ $parts == *K3* ]] && bench kernels_base_b256 --configs "" --ab-config base --batch-size 256 --steps 10 "${PRESET[@]}" \
    --ab "kernels=$K3_SETS"
  [[ $parts == *K4* ]] && bench kernels_large_b256 --configs "" --ab-config large --batch-size 256 --steps 10 "${PRESET[@]}" \
    --ab "kernels=none,$best" && bench kernels_base_b512 --configs "" --ab-config base --batch-size 512 --steps 10 \
    "${PRESET[@]}" --ab "kernels=none,$best"
  [[ $parts == *K5* ]] && timeout 400 $PY -m tools.kernel_benchmark --part curve --size base --batch 64 --steps 500 \
    --kernels "$best" ${data:+--data $data} 2>&1 | tee "$OUT/kernel_curve.log" | tail -1
  summary kernel_tests
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
  | tee -a "$OUT/gpu.txt"

bench() {  # name, then the benchmark's arguments
  local name=$1; shift
  timeout 400 $PY -m tools.benchmark --backend gpu --seq-len 128 --steps 20 --warmup 3 --peak-tflops "$PEAK_TFLOPS" \
    --model dtype=bfloat16 "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^{'
}
PRESET=(--model attention=cudnn --model attention_dropout=0 --model scan_unroll=24 --model hidden_act=gelu_tanh
        --model kernels=hash_dropout+layernorm+gelu)
if [ "${1:-}" = kernels ]; then kernels; exit; fi

deberta() {
  local parts=${PARTS:-D1 D2 D3 D4}
  if [[ $parts == *D1* ]]; then
    JAX_PLATFORMS=cuda timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_benchmark.py \
      -k "fused_attention or relative_terms or even_lengths" 2>&1 | tail -15 | tee "$OUT/deberta_tests.txt"
  fi
  [[ $parts == *D2* ]] && bench deberta_rtd_preset_b256 --configs deberta:base,deberta:large --objective deberta_rtd \
    --batch-size 256 --steps 10 --warmup 2 "${PRESET[@]}"
  [[ $parts == *D3* ]] && bench deberta_mlm_attention_b256 --configs "" --ab-config deberta:base --objective mlm \
    --batch-size 256 --steps 10 --warmup 2 "${PRESET[@]}" --ab attention=einsum,cudnn
  [[ $parts == *D4* ]] && bench bert_base_preset_b256 --configs base --batch-size 256 --steps 10 --warmup 2 "${PRESET[@]}"
  summary deberta_tests
}
if [ "${1:-}" = deberta ]; then deberta; exit; fi

# (only the attention tests: the CLI tests there expect the CPU backend that JAX_PLATFORMS=cuda takes away)
JAX_PLATFORMS=cuda timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_benchmark.py \
  -k "fused_attention or cudnn_attention or even_lengths" 2>&1 | tail -5 | tee "$OUT/attention_test.txt"

bench base_large_preset_b256 --configs base,large --batch-size 256 "${PRESET[@]}" --ab hidden_act=gelu,gelu_tanh
bench base_einsum_b256 --configs base --batch-size 256
bench base_preset_b512 --configs base --batch-size 512 "${PRESET[@]}"
bench base_preset_s512 --configs base --batch-size 64 --seq-len 512 "${PRESET[@]}"
