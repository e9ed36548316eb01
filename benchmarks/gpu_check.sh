#!/usr/bin/env bash
# The CUDA backend on a real NVIDIA GPU, in about 5 minutes (docs/ARCHITECTURE.md, "cuda backend"):
#   1. every CUDA test (tests/test_cuda_*.py) WITHOUT numba's simulator: the kernels against their
#      numpy twins and the CUDA model against the CPU backend, compiled for this GPU;
#   2. benchmarks/gpu_check.py: full-model logits of the tiny synthetic model vs the CPU path
#      (KLD <= 1e-4), then decode / prefill tokens/s of a full-width synthetic model built here, at
#      --gpu-experts all / half / none and on the CPU alone -> benchmarks/results/gpu-<GPU>.json.
# Usage: bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --layers 28]
# Python: $PYTHON, else .venv/bin/python, else python3. numba needs NVVM (the CUDA toolkit, or
# `pip install nvidia-cuda-nvcc-cu12` with CUDA_HOME=<site-packages>/nvidia/cuda_nvcc). Packages the
# machine lacks can travel as wheels in .whl/ (prepared where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl platformdirs
# ); they are installed from there, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .whl ]; then
  "$PY" -m pip install --quiet --no-index --find-links .whl .whl/*.whl || true
fi
missing=$("$PY" - <<'PY'
import importlib.util
need = ["numpy", "numba", "llvmlite", "safetensors", "tokenizers", "jinja2", "tqdm", "platformdirs", "ml_dtypes",
        "sentencepiece", "psutil", "threadpoolctl", "pytest"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_check: $PY lacks: $missing (carry them as wheels in .whl/, see the top of this script)" >&2
  exit 2
fi
export ERNIE_EDGE_CUDA_TESTS=gpu NUMBA_ENABLE_CUDASIM=0 OMP_WAIT_POLICY=passive PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "from ernie_edge.placement import probe_gpu; g, why = probe_gpu(); print('gpu:', g or why); raise SystemExit(0 if g and not g.simulated else 2)"
start=$(date +%s)
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_kernels_layers.py \
  tests/test_cuda_model.py
echo "gpu_check: CUDA tests passed on the GPU in $(( $(date +%s) - start )) s"
timeout 420 "$PY" benchmarks/gpu_check.py "$@"
echo "gpu_check: done in $(( $(date +%s) - start )) s"
