#!/usr/bin/env bash
# Issue 3's device measurements in one call (a fresh machine: fla's Triton autotuning is slow the
# first time, so nothing else shares the call). Runs, each with its own time limit and log:
#   1. tests/test_student_gpu.py          fla kernels vs float32 reference, bf16 student, packing
#   2. scripts/bench_kernels.py --batch 1 parity + speed, fla vs PyTorch chunked, 8B layer shapes
#   3. scripts/bench_generation_memory.py memory per generated token, teacher vs all-RWKV, 4k-32k
# Logs go to $OUT (the device tool's output folder) or ./device-student; each table is printed last.
#   bash scripts/device_student.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-student}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
py=${PYTHON:-python3}
status=0
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}
step test_student_gpu 240 $py -m pytest -q -p no:cacheprovider tests/test_student_gpu.py
step bench_kernels 180 $py scripts/bench_kernels.py --batch 1 --reps 5
step bench_generation_memory 150 $py scripts/bench_generation_memory.py
exit $status
