#!/usr/bin/env bash
# GPU acceptance run: build, GPU tests, kernel benchmarks, end-to-end benchmarks. Installs nothing from the network
# (megatron-core must already be importable: on a bare GPU image carry its wheel, see benchmarks/RESULTS.md).
#
#   bash benchmarks/gpu_check.sh [--quick]
#   STAGES=tests,kernels LOGDIR=/tmp/x bash benchmarks/gpu_check.sh      # a subset; logs per stage in LOGDIR
#
# Stages (each its own process under a time limit, so one hang or crash never costs the others):
#   build    pip install --no-build-isolation --no-deps -e . (pybind11 data extension + the CUDA reward-loss extension)
#   tests    every GPU-marked test (bf16 tolerance rule, cuda backend, torch.compile tracing, model/score parity)
#   kernels  every kernel benchmark (run_all.py), tables printed
#   model    bench_model.py: reward model fwd/bwd vs stock transformers at 7B widths, vision tower
#   train    bench_train.py: one training step vs stock transformers, tokens/s, MFU, peak memory vs the planner
# Limits: LIMIT_<STAGE> seconds (defaults below). A summary of every stage's status is printed last.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=${STAGES:-build,tests,kernels,model,train}
LOGDIR=${LOGDIR:-${OUT:-/tmp/vlr_gpu_check}}
mkdir -p "$LOGDIR"
export PYTHONUNBUFFERED=1
summary=()
status=0

has() { [[ ",$STAGES," == *",$1,"* ]]; }

run_stage() {  # name limit_s command...: output to LOGDIR/name.log, tail shown, status recorded
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL_LINES:-25}" "$LOGDIR/$name.log"
  summary+=("$name: exit $rc in $(( $(date +%s) - t0 )) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')")
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || status=1
"$PY" -c "import torch, triton, transformers, megatron.core as m; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'megatron-core', \
m.__version__)" || status=1

has build && run_stage build "${LIMIT_BUILD:-240}" env MAX_JOBS=16 "$PY" -m pip install -v --no-index \
  --no-build-isolation --no-deps -e .
has tests && run_stage tests "${LIMIT_TESTS:-180}" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -rs \
  --timeout 120 --maxfail 20
has kernels && run_stage kernels "${LIMIT_KERNELS:-300}" "$PY" benchmarks/run_all.py --timeout-s "${LIMIT_KERNEL:-120}" "$@"
has model && run_stage model "${LIMIT_MODEL:-180}" "$PY" benchmarks/bench_model.py "$@"
if has train; then
  if [ -f benchmarks/bench_train.py ]; then
    run_stage train "${LIMIT_TRAIN:-240}" "$PY" benchmarks/bench_train.py "$@"
  else
    summary+=("train: benchmarks/bench_train.py not present")
  fi
fi
[ -f benchmarks/results/kernels.csv ] && cp benchmarks/results/kernels.csv "$LOGDIR/"

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
exit $status
