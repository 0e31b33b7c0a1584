#!/usr/bin/env bash
# GPU check (issue 5): the paper model (bfloat16) at 256³ on one GPU, inference and one
# training step, reference vs explicit 1x1x1 (time, XLA bytes, allocator peak), then
# XLA:GPU's per-device memory plans for 512³/1024³ training on mocked 8/16/64-GPU meshes.
# Under 9 minutes on an H100; every phase has its own time limit. Needs only jax (with
# CUDA), flax, optax and numpy: on a machine without the project's .venv it uses python3.
# Results: a table on stdout, JSON in $OUT (or runs/gpu_check). See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec timeout 560 "$PY" benchmarks/gpu_check.py "$@"
