#!/usr/bin/env bash
# GPU acceptance run. Installs nothing (megatron-core must already be importable: carry its wheel to a bare GPU
# image). From the repository root on a CUDA machine:
#   bash benchmarks/gpu_check.sh [--quick]
# 1. builds the optional CUDA extension in place when nvcc is present (compiles our own sources, no downloads),
# 2. runs every GPU-marked test (kernels: bf16 tolerance rule, CUDA backend, torch.compile tracing; model and
#    scoring parity with the automatic kernels),
# 3. runs the end-to-end model benchmark, then every kernel benchmark, and prints their tables last.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

if command -v nvcc >/dev/null 2>&1; then
  echo "=== building vlr_kernels._cuda in place"
  "$PY" setup.py build_ext --inplace >/tmp/vlr_build_ext.log 2>&1 || { echo "CUDA extension build FAILED:"; tail -40 /tmp/vlr_build_ext.log; status=1; }
else
  echo "=== nvcc absent: the cuda backend tests will skip"
fi

echo "=== GPU tests"
"$PY" -m pytest -q -m gpu tests -p no:cacheprovider -rs || status=1

echo "=== end-to-end model benchmark"
"$PY" benchmarks/bench_model.py "$@" || status=1

echo "=== kernel benchmarks"
"$PY" benchmarks/run_all.py "$@" || status=1
exit $status
