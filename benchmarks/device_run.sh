#!/usr/bin/env bash
# The device measurements, as named steps that fit one device call together (issues 3, 10, 11).
# Each step has its own time limit and log; the logs come back as $OUT/logs-HHMMSS-PID.tgz (one per
# invocation, so two in one device call keep both) and each step's
# last lines (its table) are printed. Wheels the device image lacks go in .whl (README).
#   bash benchmarks/device_run.sh STEP[:SECONDS] ...
# Steps:
#   tune          fla configs (MIXERS, default rwkv7; SHAPES "HEADSxHEAD_SIZE ...", default
#                 32x128) into shared/student/ops/fla_configs/<GPU>, only the keys not there
#                 yet (candidates compiled by one process per core first), returned as
#                 $OUT/fla_configs.tgz (extract it into the tree before the next call: a cut
#                 tune resumes from it)
#   check         first fla fwd+bwd on an empty Triton cache with the shipped configs (MIXERS,
#                 default rwkv7 rwkv6; SHAPES; STATES, default "given none")
#   second        "the second process tunes nothing": two processes each time their first
#                 fwd+bwd at SECOND_SHAPE (default 9x64; MIXERS, default rwkv7) with the shipped
#                 configs left out, an empty kept-config cache at the start and a fresh Triton
#                 cache each; the first tunes (candidates compiled by one process per core) and
#                 keeps, the second should tune 0 keys; the cache comes back as
#                 $OUT/fla_second_cache.tgz. SECOND_TRITON_CACHE=DIR: the first process uses
#                 that Triton cache (e.g. ~/.triton/cache after a tune) instead of compiling
#   pending       benchmarks/bench_pending_nccl.py: what a waiting NCCL kernel costs the compute
#   linktest      tests/test_link_gpu.py: link over NCCL == direct forward, P2P transport
#   benchlink     benchmarks/bench_link.py: link transfer vs raw NCCL
#   trainer       benchmarks/bench_trainer.py at the 8B layer shapes: prefetch on/off pairs,
#                 the reference protocol, and the student alone (MFU); PAIRS, STEPS and
#                 STUDENT_MODES (checkpointing modes of the student-alone arm) from the env
#   reconnect     benchmarks/bench_reconnect.py: kill -9 the teacher mid-run over NCCL
#   student       benchmarks/bench_student.py at the 8B layer shapes (the student alone, MFU): arms
#                 OPTIMIZER:MICRO_BATCHES[:LOSS_KERNEL], AdamW foreach (baseline) or fused, micro
#                 batches per optimizer step, train.loss_kernel (default auto)
#                 (STUDENT_ARMS="foreach:1 fused:1 fused:8", STUDENT_MODES="converted none")
#   losstests     tests/test_losses_gpu.py: the Triton KL + CE kernel == its PyTorch reference
#   benchloss     benchmarks/bench_loss.py: that kernel vs the chunked PyTorch path
#   studenttests  tests/test_student_gpu.py (GPU_TESTS="expr" selects with pytest -k)
#   imports       what a trainer stage imports before its first phase mark (start-up's
#                 "process start and imports", 10-13 s on the H200 on 2026-12-02), twice (cold,
#                 then with the page cache warm), and the 15 slowest modules of the second
#                 (python -X importtime); the whole list comes back as $OUT/importtime.txt
#   kernels       benchmarks/bench_kernels.py --batch 1 (parity and speed, 8B layer shapes)
#   memory        benchmarks/bench_generation_memory.py (memory per generated token, 4k-32k)
#   benchsteps    benchmarks/bench_steps.py (training-step speed at real shapes, issue 19) with
#                 BENCH_STEPS_ARGS (e.g. "--shapes 135m --baseline-tree bench/base"); its JSON
#                 comes back as $OUT/bench_steps.json
#   quality       the quality experiment (issue 18, benchmarks/quality.py): imports the GGUF at
#                 $GGUF (default bench/smol.gguf) into $WORK/teacher, unpacks the corpus of
#                 benchmarks/quality_corpus.py from bench/quality/*.xz, runs the arms with
#                 QUALITY_ARGS (shell words); tables to $OUT/quality_*.{md,json}. WORK
#                 defaults to /root/quality;
#                 QUALITY_TOKENIZER=DIR (a copy of the teacher's tokenizer) prepares the data
#                 while the GGUF imports
# A step's limit is cut to what is left of the device call: CALL_LIMIT seconds (default 600, the
# device's per-call limit) from CALL_STARTED (epoch seconds, default this script's start; set it
# first thing in a call whose command does more before this script, e.g. `export
# CALL_STARTED=$(date +%s)` ahead of the wheels' install), less CALL_RESERVE (default 45 s: a
# SIGTERMed trainer's checkpoint and the logs' archive). A call killed at its own limit comes back
# with nothing and its machine is gone (2026-12-04: a quality:560 step after a 34 s install).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-out}
logs=$(mktemp -d)
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
status=0
call_end=$(( ${CALL_STARTED:-$(date +%s)} + ${CALL_LIMIT:-600} - ${CALL_RESERVE:-45} ))

run_step() {
  local name=${1%%:*} limit=${1#*:}
  [ "$limit" = "$1" ] && limit=300
  local left=$(( call_end - $(date +%s) ))
  if [ "$left" -le 0 ]; then
    echo "== $name: not run, no time left in the call (CALL_LIMIT, CALL_STARTED, CALL_RESERVE)"
    status=1; return
  fi
  if [ "$left" -lt "$limit" ]; then
    echo "== $name: limit ${limit}s cut to the ${left}s left in the call"; limit=$left
  fi
  echo "== $name (limit ${limit}s) $(date +%T)"
  local start=$(date +%s)
  case $name in
    tune) (timeout "$limit" $py -m benchmarks.tune_fla tune --mixer ${MIXERS:-rwkv7} \
             --shapes ${SHAPES:-32x128} --compile-workers ${COMPILE_WORKERS:-$(nproc)}
           rc=$?  # the shapes tuned before a time limit are written too: keep them
           tar czf "$out/fla_configs.tgz" shared/student/ops/fla_configs; exit $rc) ;;
    check) timeout "$limit" $py -m benchmarks.tune_fla check --mixer ${MIXERS:-rwkv7 rwkv6} \
             --shapes ${SHAPES:-32x128} --states ${STATES:-given none} ;;
    second) (kept=$PWD/bench/fla-second-cache; rm -rf "$kept"; mkdir -p "$kept"
             end=$(( $(date +%s) + limit )) rc=0
             for proc in 1 2; do
               echo "-- process $proc"
               left=$(( end - $(date +%s) )); [ $left -gt 0 ] || { rc=124; break; }
               LLAMA2RWKV_KERNEL_CACHE=$kept timeout $left \
                 $py -m benchmarks.tune_fla first-step --mixer ${MIXERS:-rwkv7} \
                 --shapes ${SECOND_SHAPE:-9x64} --no-shipped $([ $proc = 1 ] && if \
                   [ -n "${SECOND_TRITON_CACHE:-}" ]; then echo --triton-cache "$SECOND_TRITON_CACHE"
                   else echo --compile-workers "$(nproc)"; fi) || { rc=$?; break; }
             done
             tar czf "$out/fla_second_cache.tgz" -C "$kept" .; exit $rc) ;;
    pending) timeout "$limit" $py -m benchmarks.bench_pending_nccl --trace "$logs" ;;
    linktest) timeout "$limit" $py -m pytest -q -p no:cacheprovider tests/test_link_gpu.py ;;
    benchlink) timeout "$limit" $py -m benchmarks.bench_link --reps 8 ;;
    trainer) timeout "$limit" $py -m benchmarks.bench_trainer --tokenizer bench/tok \
               --data bench/data2048 --config configs/bench_8b_layers.yaml --shape 8b-layers \
               --pairs ${PAIRS:-2} --steps ${STEPS:-14} --trace "$logs" \
               --student-modes ${STUDENT_MODES:-none converted all} ;;
    reconnect) timeout "$limit" $py -m benchmarks.bench_reconnect --tokenizer bench/tok \
                 --data bench/data2048 ;;
    student) timeout "$limit" bash -c "
               set -e; m=/tmp/teacher-8b-layers
               $py -m shared.tiny --output \$m --tokenizer bench/tok --hidden-size 4096 \
                 --layers 8 --heads 32 --kv-heads 8 --intermediate-size 14336 \
                 --model-vocab-size 128256 --dtype bfloat16 --device cuda >/dev/null
               for arm in ${STUDENT_ARMS:-foreach:1 fused:1 fused:8}; do
                 IFS=: read -r opt accum loss <<< \$arm
                 $py -m benchmarks.bench_student --config configs/bench_8b_layers.yaml --model \$m \
                   --data bench/data2048 --steps 8 --modes ${STUDENT_MODES:-converted none} \
                   --optimizer \$opt --train.grad_accum \$accum \
                   --train.loss_kernel \${loss:-auto} | grep -v '^|---' | grep '^| [a-z]'
               done" ;;
    losstests) timeout "$limit" $py -m pytest -q -p no:cacheprovider tests/test_losses_gpu.py ;;
    benchloss) timeout "$limit" $py -m benchmarks.bench_loss ;;
    imports) (code="import services.trainer.__main__, services.trainer.loop, deepspeed
from transformers import AutoTokenizer
from shared.data_loader import TrainBatches"
              for pass in cold warm; do
                start_ns=$(date +%s%N)
                timeout "$limit" $py -X importtime -c "$code" 2>"$out/importtime.txt" || exit $?
                echo "-- $pass: $(( ($(date +%s%N) - start_ns) / 1000000 )) ms"
              done
              # cumulative microseconds, the top-level modules' and their children's
              sort -t'|' -k2 -n -r "$out/importtime.txt" >"$logs/importtime-sorted.txt"
              head -15 "$logs/importtime-sorted.txt") ;;
    studenttests) timeout "$limit" $py -m pytest -q -p no:cacheprovider tests/test_student_gpu.py \
                    ${GPU_TESTS:+-k "$GPU_TESTS"} ;;
    kernels) timeout "$limit" $py -m benchmarks.bench_kernels --batch 1 --reps 5 ;;
    memory) timeout "$limit" $py -m benchmarks.bench_generation_memory --profile-decode ;;
    benchsteps) (eval "args=(${BENCH_STEPS_ARGS:-})"  # shell words: --variant NAME='--a b'
                 # the work dir holds the random teachers' weights (0.5 GB at 135m): outside the
                 # logs archive, which came back over the transfer limit with them on 2026-12-02
                 work=${BENCH_STEPS_WORK:-/root/bench-steps}; rm -rf "$work/logs"
                 timeout "$limit" $py -m benchmarks.bench_steps "${args[@]}" \
                   --workdir "$work" --json "$out/$(basename "$work").json"; rc=$?
                 cp -r "$work/logs" "$logs/bench-steps-logs"; exit $rc) ;;
    quality) (set -e; work=${WORK:-/root/quality}; mkdir -p "$work/corpus"
              end=$(( $(date +%s) + limit ))  # one limit for the import and the arms together
              trap 'cp "$work"/*.log "$logs"/ 2>/dev/null || true' EXIT  # the stages' own logs
              for f in bench/quality/*.xz; do
                [ -f "$work/corpus/$(basename "${f%.xz}")" ] || xz -dc "$f" >"$work/corpus/$(basename "${f%.xz}")"
              done
              tok=${QUALITY_TOKENIZER:-}  # a copy of the teacher's tokenizer: data while it imports
              if [ -n "$tok" ] && [ ! -f "$work/data/train/card.json" ]; then
                $py -c "import sys; from pathlib import Path; from benchmarks.quality_steps import \
prepare_data; prepare_data(*map(Path, sys.argv[1:]))" "$work/corpus" "$tok" "$work" \
                  >"$logs/quality-data.log" 2>&1 & data=$!  # quality.py's data, its tokenizer
              fi
              [ -f "$work/teacher/config.json" ] || timeout $(( end - $(date +%s) )) \
                $py -m services.teacher.gguf \
                --gguf "${GGUF:-bench/smol.gguf}" --output "$work/teacher" --no-check
              if [ -n "${data:-}" ]; then
                wait "$data" || true
                cmp -s "$tok/tokenizer.json" "$work/teacher/tokenizer.json" || rm -rf "$work/data"
              fi
              eval "qargs=(${QUALITY_ARGS:-})"  # shell words: --arm-args ARM='--a b'
              timeout $(( end - $(date +%s) )) $py -m benchmarks.quality --teacher "$work/teacher" \
                --corpus "$work/corpus" --work "$work" --out "$out" "${qargs[@]}") ;;
    *) echo "unknown step $name"; false ;;
  esac >"$logs/$name.log" 2>&1
  local rc=$?
  grep -v -i "warn" "$logs/$name.log" | tail -n ${TAIL:-30}
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s"
  [ "$rc" -eq 0 ] || status=1
}

for step in "$@"; do run_step "$step"; done
tar czf "$out/logs-$(date +%H%M%S)-$$.tgz" -C "$logs" .  # two invocations in one second: two files
exit $status
