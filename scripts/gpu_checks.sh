#!/usr/bin/env bash
# Every GPU check of the project in one go, for a lent CUDA machine with torch installed
# (the device tool's H100/H200 image): the CUDA tests, selection at N = 2,000,000 and
# scoring throughput. Wheels the image lacks travel in .whl/ (segmentation-models-pytorch,
# faiss-cpu; faiss-gpu's wheels need CUDA 12 runtimes, too big to carry).
#   OUT=gpu_out bash scripts/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
python3 -c "import torch, segmentation_models_pytorch as smp; print('torch', torch.__version__, torch.cuda.get_device_name(), 'smp', smp.__version__)"
python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_selection.py tests/test_scoring.py 2>&1 | tee "$OUT/tests_gpu.log" | tail -8
python3 scripts/bench_selection.py --device cuda --n 2000000 --skip-peers --repeat 1 --timeout 240 | tee "$OUT/bench_selection_cuda_2M.md"
python3 scripts/bench_scoring.py --device cuda --batch 32 --iters 5 | tee "$OUT/bench_scoring_cuda_unet.md"
python3 scripts/bench_scoring.py --device cuda --batch 32 --iters 5 --autocast bf16 | tee "$OUT/bench_scoring_cuda_unet_bf16.md"
python3 scripts/bench_scoring.py --device cuda --batch 32 --iters 5 --arch deeplabv3plus | tee "$OUT/bench_scoring_cuda_dlv3p.md"
