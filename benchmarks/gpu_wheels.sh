#!/usr/bin/env bash
# Prepare a run of benchmarks/gpu_check.sh on a bare lent GPU image (Python 3.12, CUDA torch, no megatron-core,
# Liger or our transformers version), from a machine with PyPI access:
#   bash benchmarks/gpu_wheels.sh        # downloads the wheels into .whl/ (git-ignored via .git/info/exclude)
# and a clean export of HEAD into .clean/, then prints the command to run there (carry .whl and .clean).
# The wheels: megatron-core 0.19.2 (the newest for cp312; 0.16.1 is what the CPU suite pins for Python 3.11),
# liger-kernel (a benchmark peer), the transformers version the CPU suite uses (parity is checked against it) and
# pytest-xdist + execnet (gpu_check.sh runs the GPU tests on several processes when it can import xdist).
# The printed command presets VLR_TUNE_THREADS=8 (threaded tuner compiles; gpu_check's probe of it passed in runs C
# and D), which skips that probe's 45 s.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .git/info .whl
for p in /.whl/ /.clean/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
transformers_version=$("$PY" -c "import transformers; print(transformers.__version__)")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  megatron-core==0.19.2 liger-kernel "transformers==$transformers_version" pytest-xdist execnet
rm -rf .clean && mkdir .clean && git archive HEAD | tar -x -C .clean
sha=$(git rev-parse --short HEAD)
cat <<EOF
wheels in .whl: $(ls .whl | tr '\n' ' ')
run on the GPU machine (carry [".whl", ".clean"]; limits per stage in gpu_check.sh's header; ask for kind
nvidia-h200 if the session may: the vision-windows target needs ~87% of an H100's copy ceiling, ~62% of an H200's):
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1; cd .clean && VLR_GIT_SHA=$sha VLR_TUNE_THREADS=8 LOGDIR=\$OUT bash benchmarks/gpu_check.sh 2>&1 | tee \$OUT/console.txt
EOF
