#!/usr/bin/env bash
# GPU acceptance run: build, GPU tests, kernel benchmarks, end-to-end benchmarks. Installs nothing from the network
# (megatron-core must already be importable: on a bare GPU image carry its wheel, see benchmarks/RESULTS.md).
#
#   bash benchmarks/gpu_check.sh [--quick]
#   STAGES=tests,kernels LOGDIR=/tmp/x bash benchmarks/gpu_check.sh      # a subset; logs per stage in LOGDIR/logs.tar.gz
#
# Stages (each its own process under a time limit, so one hang or crash never costs the others), in this order:
#   build      pip install --no-build-isolation --no-deps -e . (pybind11 data extension + the CUDA reward-loss one)
#   tests      GPU-marked tests (bf16 tolerance rule for every kernel and launch candidate, cuda backend,
#              torch.compile tracing, model parity, no host sync in the model's input path, optimizer memory);
#              TESTS="path::name ..." picks them (default: the kernel, model, planner and parallel GPU tests, the
#              attention launch-candidate tests last; TESTS=tests adds the score CLI runs, which passed in A and B)
#   new_probe  the GPU tests of the attention launch candidates never run on a GPU before (test ids ending in
#              -new; vlr_kernels.attention.varlen_tiles.new_candidate_allowed), in processes of their own
#              that run beside the tests stage:
#              VLR_ATTN_NEW then lists for the benchmarks' tuner the candidates whose every test passed (1: all,
#              0: none; tests/kernels/new_probe.py; preset VLR_ATTN_NEW to skip the probe; none is new since run G:
#              pytest then collects no test, exit 5, which passes). The flat dK/dV
#              candidates had this probe until run D passed all ten; VLR_ATTN_FLAT=0 still keeps them out
#   train      bench_train.py: one training step vs stock transformers, tokens/s, MFU, peak memory vs the planner
#              (providers hf_sdpa, ours, ours_plain and a profile of ours/ours_plain; TRAIN_ARGS="" runs every
#              provider including ours_megatron, unprofiled). Not in the default STAGES since run D measured issue
#              7's target (STAGES=...,train adds it, ~85 s)
#   attention  bench_attention.py: the four varlen-attention workloads (ATTN_WORKLOADS, default pairs,windows,full,
#              llm: the ones with open targets first), one process each (stages attention_<workload>), every provider
#              checked against the SDPA loop (output and gradients) before it is timed
#   kernels    run_all.py for issue 4's kernel benchmarks (rotary, reward loss, SwiGLU, RMSNorm: its acceptance
#              wants them in one run); KERNELS="bench_a.py,bench_b.py" picks others (bench_adamw.py)
#   model      bench_model.py: reward model fwd/bwd vs stock transformers at 7B widths, vision tower (not in the
#              default STAGES)
# Extra arguments: the script's own ("$@", e.g. --quick) go to every benchmark; TRAIN_ARGS, ATTN_ARGS (e.g.
# --candidates), KERNEL_ARGS and MODEL_ARGS to one stage each. Limits: LIMIT_<STAGE> seconds (LIMIT_ATTENTION: all
# workloads together; LIMIT_KERNEL: each kernel benchmark configuration), within TOTAL_S for the whole script (560:
# one 600 s device call after the wheel install), the slack of early stages going to attention and kernels; the
# kernels stage leaves out bench_reward_loss --prenormed (measured in run D; KERNELS_SKIP= runs it). Rows go
# straight to LOGDIR/kernels.csv (VLR_BENCH_CSV). The new-candidate probe (<= 90 s) runs beside the tests stage; the
# tuning probe (<= 45 s; preset VLR_TUNE_THREADS=8 to skip it: it passed in runs C and D) counts too. The tests and
# bench_train run the default launch
# configurations (VLR_TUNE=0: the tuner's compiles would not fit; the candidate tests force every candidate under
# the bf16 rule); the kernel benchmarks tune. A summary of every stage is printed last. To prepare a bare image:
# benchmarks/gpu_wheels.sh.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=${STAGES:-build,tests,attention,kernels}
LOGDIR=${LOGDIR:-${OUT:-/tmp/vlr_gpu_check}}
# A device call returns at most 8 files: every stage's log goes to LOGDIR/logs, packed into LOGDIR/logs.tar.gz on
# exit (H200 run E lost tests.log and the probe's log to that limit). What comes back: logs.tar.gz, kernels.csv,
# targets.md and the caller's console copy; failing tests' summary lines are printed to the console too.
LOGS=$LOGDIR/logs
mkdir -p "$LOGS"
pack_logs() { tar -czf "$LOGDIR/logs.tar.gz" -C "$LOGDIR" logs && rm -rf "$LOGS"; }
trap pack_logs EXIT
export PYTHONUNBUFFERED=1
export VLR_BENCH_CSV=${VLR_BENCH_CSV:-$LOGDIR/kernels.csv}  # every benchmark's rows, each as it is measured
# TOTAL_S: the whole script's time (the device call's limit minus the wheel install before it). Stages keep their
# LIMIT_*; time the earlier stages left unused (a probe that ends early, quick tests) goes half to the attention
# workloads and the rest to the kernel benchmarks, each stage capped so the script ends in time.
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-560}
left() { echo $(( T0 + TOTAL_S - $(date +%s) )); }
summary=()
status=0

has() { [[ ",$STAGES," == *",$1,"* ]]; }

run_stage() {  # name limit_s command...: output to LOGDIR/logs/name.log, tail shown, status recorded
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL_LINES:-25}" "$LOGS/$name.log"
  LAST_S=$(( $(date +%s) - t0 ))
  summary+=("$name: exit $rc in $LAST_S s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')")
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || status=1
"$PY" -c "import torch, triton, transformers, megatron.core as m; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'megatron-core', \
m.__version__)" || status=1

has build && run_stage build "${LIMIT_BUILD:-40}" env MAX_JOBS=16 "$PY" -m pip install -v --no-index \
  --no-build-isolation --no-deps -e .
# shellcheck disable=SC2086  # TESTS and the *_ARGS variables are word lists
# the quick kernel/model/optimizer tests first, the attention launch-candidate tests (~2.5 s of compile each) last
FAST_TESTS="tests/kernels/test_reward_loss.py tests/kernels/test_reward_loss_kernels.py tests/kernels/test_rmsnorm.py \
tests/kernels/test_rotary.py tests/kernels/test_swiglu.py tests/kernels/test_adamw.py tests/kernels/test_tune.py \
tests/model/test_gpu.py tests/model/test_host_sync.py tests/runtime/test_plan.py tests/parallel"
# Most of a GPU test's time is Triton compiling its kernels on one core: with pytest-xdist importable (gpu_wheels.sh
# carries it) the tests run on TEST_WORKERS processes sharing the GPU (default 8; 0 = one process) and the probe
# beside them on PROBE_WORKERS (default 2: 6 tests since run E). Runs E/F: 71 tests on 4 workers took 59-75 s of
# pytest time (+ ~15 s of start), mostly single-core Triton compiles, on a 16-core machine.
# Run D's single process got through 28 of 52 tests in the 120 s.
XDIST=()
PROBE_XDIST=()
if [ "${TEST_WORKERS:-8}" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "${TEST_WORKERS:-8}")
  [ "${PROBE_WORKERS:-2}" -gt 0 ] && PROBE_XDIST=(-n "${PROBE_WORKERS:-2}")
fi
summary+=("pytest workers: ${XDIST[*]:-one process (no pytest-xdist)}")
# A launch candidate's first GPU run can hit an illegal address (the first flat dK/dV candidate did in run C, before a
# loop change), which ends the CUDA context of the whole process. The candidates never run on a GPU before are tested
# in processes of their own (the new_probe stage), beside the tests stage (both mostly compile on the CPU), and the
# benchmarks' tuner gets those whose every test passed.
probe_pid=""
if [ -z "${VLR_ATTN_NEW:-}" ] && { has tests || has attention; }; then
  echo "=== new_probe (limit ${LIMIT_NEW:-90}s, beside the tests stage): log new_probe.log"
  probe_t0=$(date +%s)
  ( timeout --kill-after=15 "${LIMIT_NEW:-90}" env VLR_TUNE=0 "$PY" -m pytest -v -m gpu ${PROBE_XDIST[@]+"${PROBE_XDIST[@]}"} \
      tests/kernels/test_attention_gpu.py -k new -p no:cacheprovider --timeout 60 >"$LOGS/new_probe.log" 2>&1
    echo "$? $(date +%s)" >"$LOGS/new_probe.rc" ) &
  probe_pid=$!
fi
has tests && run_stage tests "${LIMIT_TESTS:-120}" env VLR_TUNE="${VLR_TUNE:-0}" "$PY" -m pytest -v -m gpu \
  ${XDIST[@]+"${XDIST[@]}"} ${TESTS:-$FAST_TESTS tests/kernels/test_attention_gpu.py} -k "not new" \
  -p no:cacheprovider -rsfE --timeout "${TEST_TIMEOUT:-120}" --maxfail 20 --durations 15
has tests && { grep -E "^(FAILED|ERROR) |^E  " "$LOGS/tests.log" | cut -c1-300 | head -n 60; true; }
if [ -n "$probe_pid" ]; then
  wait "$probe_pid"
  read -r probe_rc probe_t1 <"$LOGS/new_probe.rc" || { probe_rc=1; probe_t1=$(date +%s); }
  echo "=== new_probe: exit $probe_rc"
  tail -n "${TAIL_LINES:-25}" "$LOGS/new_probe.log"
  summary+=("new_probe: exit $probe_rc in $(( probe_t1 - probe_t0 )) s (beside tests)$([ "$probe_rc" = 124 ] \
    && echo ' (TIMED OUT)')$([ "$probe_rc" = 5 ] && echo ': no new candidate (pytest collected no test)')")
  if [ "$probe_rc" = 5 ]; then  # nothing new (run G ran every candidate): nothing for the verdict to keep out
    VLR_ATTN_NEW=1
  else
    [ "$probe_rc" = 0 ] || status=1
    # per candidate: the ones whose every test passed (a failure, a crash or the time limit keeps out only its own)
    VLR_ATTN_NEW=$("$PY" -m tests.kernels.new_probe "$LOGS/new_probe.log" 2>>"$LOGS/new_probe.log") || VLR_ATTN_NEW=0
  fi
  export VLR_ATTN_NEW
  case "$VLR_ATTN_NEW" in
    0|1) summary+=("new-candidate probe: VLR_ATTN_NEW=$VLR_ATTN_NEW (log: new_probe.log)") ;;
    *) summary+=("new-candidate probe: $(tr ',' '\n' <<<"$VLR_ATTN_NEW" | wc -l) candidates passed, VLR_ATTN_NEW=$VLR_ATTN_NEW") ;;
  esac
fi
# The benchmarks compile every launch candidate they tune: on worker threads (VLR_TUNE_THREADS) once a probe has
# shown that works on this machine (a GPU test tuning real kernels that way on a side stream), else serially.
if [ -z "${VLR_TUNE_THREADS:-}" ] && { has attention || has kernels || has model; }; then
  timeout 45 env VLR_TUNE_THREADS=8 "$PY" -m pytest -q -m gpu tests/kernels/test_tune.py -k parallel \
    -p no:cacheprovider >"$LOGS/tune_probe.log" 2>&1
  grep -q "1 passed" "$LOGS/tune_probe.log" && export VLR_TUNE_THREADS=8
  summary+=("tune probe: VLR_TUNE_THREADS=${VLR_TUNE_THREADS:-1} (log: tune_probe.log)")
fi
# bench_train runs the default launch configurations unless TRAIN_TUNE=1: tuning every kernel of the 7B-width
# model (~60 candidate compiles) would not fit the stage; the step time is then a conservative figure
has train && run_stage train "${LIMIT_TRAIN:-130}" env VLR_TUNE="${TRAIN_TUNE:-0}" "$PY" benchmarks/bench_train.py \
  ${TRAIN_ARGS---providers hf_sdpa,ours,ours_plain --profile} "$@"
# One process per workload: an illegal address (which ends the process's CUDA context) or a slow provider costs only
# its own workload (run D's single process lost pairs and full to the stage limit). Each gets an equal share of what
# the earlier ones left of LIMIT_ATTENTION (at least 20 s).
kernels_limit=${LIMIT_KERNELS:-130}
has kernels || kernels_limit=0
model_limit=${LIMIT_MODEL:-180}
has model || model_limit=0
if has attention; then
  attn_budget=${LIMIT_ATTENTION:-165}
  slack=$(( $(left) - attn_budget - kernels_limit - model_limit ))
  [ "$slack" -le 0 ] || attn_budget=$(( attn_budget + slack / 2 ))
  [ "$slack" -ge 0 ] || attn_budget=$(( attn_budget + slack ))  # behind schedule: attention gives way
  [ "$attn_budget" -ge 20 ] || attn_budget=20
  summary+=("attention budget: $attn_budget s")
  IFS=, read -r -a attn_workloads <<<"${ATTN_WORKLOADS:-pairs,windows,full,llm}"
  attn_left=${#attn_workloads[@]}
  for w in "${attn_workloads[@]}"; do
    share=$(( attn_budget / attn_left )); [ "$share" -ge 20 ] || share=20
    run_stage "attention_$w" "$share" "$PY" benchmarks/bench_attention.py --workloads "$w" ${ATTN_ARGS:-} "$@"
    attn_budget=$(( attn_budget - LAST_S )); attn_left=$(( attn_left - 1 ))
  done
fi
if has kernels; then
  avail=$(( $(left) - model_limit ))
  [ "$avail" -ge 30 ] || avail=30
  run_stage kernels "$avail" "$PY" benchmarks/run_all.py --timeout-s "${LIMIT_KERNEL:-40}" \
    --only "${KERNELS:-bench_reward_loss.py,bench_rotary.py,bench_swiglu.py,bench_rmsnorm.py}" \
    --skip "${KERNELS_SKIP-bench_reward_loss.py --prenormed}" ${KERNEL_ARGS:-} "$@"
fi
if has model; then
  avail=$(left)
  [ "$avail" -ge 30 ] || avail=30
  run_stage model "$avail" "$PY" benchmarks/bench_model.py ${MODEL_ARGS:-} "$@"
fi

if [ -s "$VLR_BENCH_CSV" ]; then  # issue 4/5 verdicts from this run's rows (benchmarks/targets.py)
  echo; echo "=== targets"
  "$PY" benchmarks/targets.py "$VLR_BENCH_CSV" | tee "$LOGDIR/targets.md"
fi
echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
exit $status
