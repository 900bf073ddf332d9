#!/usr/bin/env bash
# The GPU comparison on one CUDA machine, cheapest first: the CUDA tests, the comparison's cases
# (profiling whatever the kernel cache lacks for this GPU; each autotm plan in a fresh process),
# VGG19's planned step kernel by kernel against the profile, then a training step larger than
# the GPU. Results go to $OUT_DIR (default results/gpu-run/).
#
#   bash scripts/gpu_comparison.sh
#   CASES="vgg19:256:14.85GiB" OVERSIZED= SKIP_TESTS=1 bash scripts/gpu_comparison.sh
#   CASES= KERNEL_TIMES= bash scripts/gpu_comparison.sh      # tests and the larger step only
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False CASES=vgg19:256:14.85GiB SKIP_TESTS=1 \
#       OVERSIZED= KERNEL_TIMES= OUT_DIR=results/gpu-run-noexp bash scripts/gpu_comparison.sh
#                                                           # another allocator setting (the reports say which)
#
# CASES: MODEL:BATCH:CAP words (CAP a fraction of the unconstrained peak or a size in GiB);
# default the reference measurements' caps, first those the fragmentation-sized repair cut changes
# (DenseNet201's), then VGG19, whose prediction misses, then ResNet152.
# OVERSIZED: MODEL:BATCH:BUDGET_GIB; default VGG19 at batch 2048 under 132 GiB on a GPU of more
# than 100 GiB, else batch 1024 under 74 GiB.
# KERNEL_TIMES: MODEL:BATCH:CAP words for benchmarks/kernel_times.py; default VGG19 at 14.85 GiB,
# the case whose prediction misses.
# ARENA: set (ARENA=1) to run each formulation also with the planned arena (--arena).
# CUDNN_BENCHMARK: set (CUDNN_BENCHMARK=1) to let cuDNN search its algorithms (--cudnn-benchmark;
# default its heuristic choice).
# ASYNC_CANDIDATES: the comparison's --async-candidates (default auto; from the H200's cached rows
# ResNet152's plans predict 3% to 5% less with 8, README "Not done yet").
# COPY_SPANS: the comparison's --copy-spans (default 15: each async copy may run in pieces beside
# up to 15 kernels; 0 keeps each beside one kernel).
# CHOOSE_ALGORITHMS: set (CHOOSE_ALGORITHMS=1) to choose every convolution's cuDNN algorithm before
# a plan's first step as the profile timed it: with the device free, and within the room the plan
# leaves its workspace where that takes more (--choose-algorithms; for the comparison and
# kernel_times.py; on an H100 VGG19's asynchronous step took 0.679 s with it, 0.720 s without).
# AUTOTM_CAP_BY: fill to take from the device what the cap does not allow, beside the memory
# fraction, so that cuDNN sees as free what the cap leaves (default fraction; the reports say which).
# REFINE_SECONDS: the comparison's --refine-seconds (default 0: on the H200, refining ResNet152's
# fitted asynchronous plan at 24.55 GiB found nothing better in 140 s, where a proxy solve of a
# graph captured on a CPU had predicted 7% less).
set -euo pipefail
cd "$(dirname "$0")/.."
# the scripts under benchmarks/ import the package from this checkout where it is not installed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT_DIR:-results/gpu-run}
CASES=${CASES-"densenet201:128:13GiB densenet201:128:5.2GiB vgg19:256:14.85GiB resnet152:256:9.82GiB resnet152:256:24.55GiB"}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "this script needs a CUDA device")'
if [ -z "${OVERSIZED+set}" ]; then
  OVERSIZED=$("$PY" -c 'import torch; big = torch.cuda.get_device_properties(0).total_memory > 100 * 2**30
print("vgg19:2048:132" if big else "vgg19:1024:74")')
fi

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== CUDA tests"
  "$PY" -m pytest -q -p no:cacheprovider --durations=8 tests/test_runtime_gpu.py tests/test_defrag.py tests/test_profiler.py tests/test_arena.py \
      -k "cuda or gpu or workspace or trace or defrag" 2>&1 | tee "$OUT/tests.log"
fi
if [ -n "$CASES" ]; then
  # one invocation per case: PyTorch's pinned host cache keeps what save_on_cpu used, and with
  # several cases in one process it outgrew the host's memory; the reports are merged after
  echo "== comparison, one invocation per case: $CASES"
  reports=()
  i=0
  for c in $CASES; do
    i=$((i + 1))
    echo "== case $c ($(date +%T))"
    "$PY" -m autotm_py bench gpu --case "$c" --steps "${STEPS:-3}" --time-limit "${TIME_LIMIT:-30}" \
        --refine-seconds "${REFINE_SECONDS:-0}" ${ARENA:+--arena} ${CUDNN_BENCHMARK:+--cudnn-benchmark} \
        ${CHOOSE_ALGORITHMS:+--choose-algorithms} --async-candidates "${ASYNC_CANDIDATES:-auto}" --copy-spans "${COPY_SPANS:-15}" --results "$OUT/case$i" \
        || echo "== case $c ended with status $?"
    if [ -f "$OUT/case$i/gpu/gpu_peers.json" ]; then reports+=("$OUT/case$i"); fi
  done
  if [ ${#reports[@]} -gt 0 ]; then
    "$PY" -m autotm_py bench gpu-merge "${reports[@]}" --out "$OUT/gpu/gpu_peers.json"
  fi
fi
for k in ${KERNEL_TIMES-vgg19:256:14.85GiB}; do
  echo "== kernel by kernel: $k"
  "$PY" benchmarks/kernel_times.py --case "$k" --plans choice,uncapped --steps "${STEPS:-3}" \
      --time-limit "${TIME_LIMIT:-30}" ${CUDNN_BENCHMARK:+--cudnn-benchmark} ${CHOOSE_ALGORITHMS:+--choose-algorithms} --out "$OUT/kernel_times_${k//:/_}.json"
done
for o in $OVERSIZED; do
  echo "== larger than the budget: $o"
  "$PY" benchmarks/gpu_peers.py --oversized "$o" --steps "${STEPS:-3}" --time-limit "${TIME_LIMIT:-30}" \
      --out "$OUT/oversized_${o//:/_}"
done
