#!/usr/bin/env bash
# Every GPU check of the project in one go (issue 15), for a lent CUDA machine whose
# python3 has torch (the device tool's H200 image): the CUDA tests, scoring throughput
# (Unet-resnet18 and DeepLabV3Plus-resnet18, 224x224, batch 32, fp32 and bf16 autocast:
# plain inference vs score_batch's eager and compiled math vs the released per-image
# backward) and selection at archive size (10^7 x 256, bf16 storage, 10,000 picks,
# k-center and k-means++). Prints the README's tables last. About 5-8 minutes on one H200;
# each step has a time limit, capped so that the whole ends within GPU_CHECKS_BUDGET_S
# (default 480 s, under the device tool's 600 s per command) with the report printed.
#
#   OUT=gpu_out bash scripts/gpu_checks.sh
#   GPU_CHECKS_SMOKE=1 PYTHON=.venv/bin/python bash scripts/gpu_checks.sh   # the script itself,
#       on the CPU at tiny sizes (no GPU numbers; the CUDA tests skip)
#
# Wheels the image lacks travel in .whl/ (segmentation-models-pytorch; see the README's
# Benchmarks section for the pip download line); faiss-gpu's wheels need CUDA 12
# runtimes the image lacks, so the labeled-set start runs on the torch backend there.
# Files left in $OUT (the device tool brings back 8 at most): gpu_checks.log (everything),
# tests_gpu.log, scoring.md, selection_archive.md, report.md, results.json.
set -uo pipefail
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
if [ "${GPU_CHECKS_SMOKE:-0}" = 1 ]; then  # a 2-core CPU compiles ~5x slower than the GPU machine
  DEVICE=cpu SLOWER=5 SCORING_SIZE="--size 64 --batch 2 --iters 1" SELECTION_SIZE="--n 20000 --d 32 --budget 20 --labeled 100"
else
  DEVICE=cuda SLOWER=1 SCORING_SIZE="--size 224 --batch 32 --iters 5" SELECTION_SIZE=""
fi
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_checks.log") 2>&1
TEE_PID=$!
JSON=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
BUDGET=${GPU_CHECKS_BUDGET_S:-$((480 * SLOWER))}
step() { echo; echo "== $1 (at ${SECONDS} s of ${BUDGET})"; }
# seconds for a step: WANT, or less so that RESERVE seconds remain for the steps after it
cap() {
  local want=$(($1 * SLOWER)) left=$((BUDGET - SECONDS - $2 * SLOWER))
  echo $((want < left ? want : (left > 5 ? left : 5)))
}

step "machine"
[ "$DEVICE" = cuda ] && nvidia-smi -L
"$PY" -c "import torch, triton, segmentation_models_pytorch as smp; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', 'triton', triton.__version__, 'smp', smp.__version__)" || exit 1

step "CUDA tests (pytest -m gpu)"
timeout "$(cap 120 330)" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/test_selection.py tests/test_scoring.py tests/test_scoring_paths.py > "$OUT/tests_gpu.log" 2>&1
echo "pytest exit status $?"
tail -15 "$OUT/tests_gpu.log"

step "scoring throughput"
for arch in unet deeplabv3plus; do
  for autocast in none bf16; do
    profile=$([ "$autocast" = none ] && echo --profile)
    # shellcheck disable=SC2086 # the size options are words
    timeout "$(cap 70 120)" "$PY" scripts/bench_scoring.py --device "$DEVICE" --arch "$arch" $SCORING_SIZE \
      --autocast "$autocast" --math-paths eager compiled $profile \
      --json "$JSON/scoring_${arch}_${autocast}.json" 2>&1 | grep --line-buffered -v "^USDT" | tee -a "$OUT/scoring.md"
    echo "bench_scoring $arch $autocast: exit status ${PIPESTATUS[0]}"
  done
done

step "selection at archive size"
# shellcheck disable=SC2086
timeout "$(cap 110 10)" "$PY" scripts/bench_selection_archive.py --device "$DEVICE" $SELECTION_SIZE \
  --verify --json "$JSON/selection_archive.json" \
  2>&1 | tee "$OUT/selection_archive.md"
echo "bench_selection_archive: exit status ${PIPESTATUS[0]}"

if [ $((BUDGET - SECONDS)) -gt $((90 * SLOWER)) ]; then
  step "extra, as time allows: Unet fp32 with cudnn.benchmark (autotuned convolutions, the grouped weight-gradient too)"
  # shellcheck disable=SC2086
  timeout "$(cap 70 10)" "$PY" scripts/bench_scoring.py --device "$DEVICE" --arch unet $SCORING_SIZE \
    --autocast none --math-paths eager compiled --cudnn-benchmark --skip-memory \
    --json "$JSON/scoring_unet_none_cudnn_benchmark.json" 2>&1 | grep --line-buffered -v "^USDT" | tee -a "$OUT/scoring.md"
  echo "bench_scoring unet none cudnn.benchmark: exit status ${PIPESTATUS[0]}"
fi

step "tables for the README"
"$PY" scripts/gpu_report.py "$JSON" --out "$OUT/results.json" | tee "$OUT/report.md"
grep -E "passed|failed|error" "$OUT/tests_gpu.log" | tail -1
echo "total ${SECONDS} s"
exec >&- 2>&-
wait "$TEE_PID"  # the log is complete on disk before the command returns
