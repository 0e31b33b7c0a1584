#!/usr/bin/env bash
# One GPU session's measurements (issues 14 and 17), in one command of under 9 minutes:
#   1. the GPU check's real runs (benchmarks/gpu_check.py, no plans): the paper model at 256³,
#      inference and one training step on the explicit backend (and reference inference):
#      the train ÷ inference ratio and the training-step time the scaling table uses;
#   2. then, at once: the lesion-recipe sweep (benchmarks/lesion_recipe.py, 64³, one process
#      per recipe) and the resolution study at 128³ (arms 64³ and 128³, the paper recipe).
# Every phase has its own time limit; results (JSON, tables, trained weights, histories)
# land in $OUT (or runs/gpu_session) as a few files. Needs jax (CUDA), flax, optax, orbax,
# numpy, scipy, matplotlib: on a machine without the project's .venv it uses python3.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-runs/gpu_session}"
STEPS="${STEPS:-800}"
WORK="${WORK:-/tmp/gpu_session}"
SWEEP_RENDER="${SWEEP_RENDER:-64}" STUDY_RENDER="${STUDY_RENDER:-128}" EVAL_CASES="${EVAL_CASES:-8}"
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

echo "== 1. GPU check (real runs, no plans)"
[ -n "${SKIP_CHECK:-}" ] || timeout 230 "$PY" benchmarks/gpu_check.py --skip-plans --budget-s 200 --out "$WORK/check" \
  --phases infer:reference infer:explicit train:explicit 2>&1 | tail -20 | tee "$OUT/gpu_check.log"
cp "$WORK/check/gpu_check.json" "$OUT/" 2>/dev/null

echo "== 2. lesion recipes at 64³ and the resolution study at 128³ (in parallel)"
timeout 320 "$PY" benchmarks/lesion_recipe.py --steps "$STEPS" --render "$SWEEP_RENDER" --eval-cases "$EVAL_CASES" --parallel 8 --quiet --eval-every 200 \
  --workdir "$WORK/recipes" --recipes unit paper paper_lr1e-2 paper_dice1 paper_batchnorm paper_wide \
  paper_alldice w148 >"$WORK/recipes.log" 2>&1 &
RECIPES=$!
timeout 320 "$PY" benchmarks/resolution_study.py --render "$STUDY_RENDER" --resolutions $((STUDY_RENDER / 2)) "$STUDY_RENDER" \
  --steps "${STUDY_STEPS:-600}" --recipe paper --backend reference --mesh 1x1x1 --eval-cases "$EVAL_CASES" --workdir "$WORK/study" \
  >"$WORK/study.log" 2>&1 &
STUDY=$!
wait $RECIPES; echo "recipes exit $?"
wait $STUDY; echo "study exit $?"
tail -15 "$WORK/recipes.log"
tail -12 "$WORK/study.log" | grep -v '%|'
# Small files only: histories, evaluations, trained weights (no checkpoints).
tar -C "$WORK" -czf "$OUT/runs.tgz" --exclude checkpoints recipes study recipes.log study.log 2>/dev/null
ls -la "$OUT"
