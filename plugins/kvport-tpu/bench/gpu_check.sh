#!/usr/bin/env bash
# kvport-tpu's JAX worker on one GPU (jax with CUDA), in one go, within about five minutes:
#   parity  greedy tokens of the JAX worker vs transformers float32, both on the GPU
#   build   W1's random-weight Llama-3.2-1B-shaped bf16 model
#   w1      W1 through the JAX worker (--device xla), then through kvport-cuda, same requests
# Results go to $OUT (default /tmp/kvport-tpu-gpu): parity.json, w1_xla.json, w1_cuda.json.
# NUM_PROMPTS (default 128: the first 128 of W1's 256 requests, to fit the time) sets W1's size.
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT="${OUT:-/tmp/kvport-tpu-gpu}"
N="${NUM_PROMPTS:-128}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . -e plugins/kvport-tpu \
    -e plugins/kvport-cuda 2>&1 | grep -v "^WARNING: Running pip as" || true
$PY -c "import jax, kvport_tpu; print('jax', jax.__version__, jax.devices())" || exit 1
bench=plugins/kvport-tpu/bench/gpu_check.py
echo "=== parity"; timeout 75 $PY $bench parity --json "$OUT/parity.json" 2>&1 | tail -25
echo "=== build"; timeout 45 $PY $bench build /tmp/kvport-llama1b 2>&1 | tail -5
echo "=== w1 xla"; timeout 110 $PY $bench w1 /tmp/kvport-llama1b --num-prompts "$N" --deadline 60 \
    --json "$OUT/w1_xla.json" 2>&1 | tail -40
echo "=== w1 cuda"; timeout 60 $PY -m kvport.api.cli bench throughput --model /tmp/kvport-llama1b \
    --device cuda --dtype bfloat16 --random-tokens --num-prompts "$N" --max-model-len 2048 \
    --max-num-seqs 256 --max-num-batched-tokens 2048 --output-json "$OUT/w1_cuda.json" \
    2>&1 | tail -25
echo "=== done"
