#!/usr/bin/env bash
# One GPU session for issue 25 item 4, in one command of under 9 minutes on one H100/H200:
# the paper model (bfloat16) at 256³, training step and inference, variant by variant
# (benchmarks/gpu_step.py: one process each, its own time limit):
#   explicit backend (baseline) and plain jax.jit of the same model; --comm-overlap on;
#   without the optimization_barrier that pins kernel gradients; xla_gpu_autotune_level 0
#   and 2 (default 4); --remat; the baseline training step also profiled (kernels by name).
# Every row records seconds, XLA's FLOPs (cost_analysis), TFLOP/s, the fraction of the
# device's dense bf16 peak (looked up by name), compile seconds, XLA bytes, allocator peak,
# an HLO hash and the device's name (nvidia-smi and JAX); derived: train ÷ inference,
# explicit ÷ jit, each variant ÷ the baseline.
# Results in $OUT (default runs/gpu_session): device.txt, versions.txt, gpu_step.json,
# gpu_step.log, profile/ (the trace, kept if under 20 MB).
# Dry run on a CPU (every phase, tiny sizes):
#   SIZE=16 ALLOW_CPU=1 BUDGET=1500 OUT=/tmp/gpu_session bash benchmarks/gpu_session.sh
# Needs jax (CUDA), flax, optax, numpy: on a machine without the project's .venv it uses python3.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-runs/gpu_session}"
SIZE="${SIZE:-256}"
BUDGET="${BUDGET:-450}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
EXTRA=()
[ -n "${ALLOW_CPU:-}" ] && EXTRA+=(--allow-cpu)
[ -n "${VARIANTS:-}" ] && EXTRA+=(--variants $VARIANTS)

echo "== 0. device and versions"
timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader \
  2>&1 | tee "$OUT/device.txt"
timeout 60 "$PY" -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tail -1 | tee "$OUT/versions.txt"

echo "== 1. paper model at ${SIZE}³: training step and inference, variant by variant"
timeout $((BUDGET + 60)) "$PY" benchmarks/gpu_step.py --size "$SIZE" --budget-s "$BUDGET" --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"} \
  2>&1 | tee "$OUT/gpu_step.log"
echo "gpu_step exit ${PIPESTATUS[0]}"

echo "== 2. what comes back"
find "$OUT/profile" -type f -size +20M -print -delete 2>/dev/null
ls -la "$OUT"
