#!/usr/bin/env bash
# Two teacher groups of one trainer each, started exactly as compose.yaml starts the stack,
# through the no-Docker runner: teacher-0 on GPU $T0, teacher-1 on GPU $T1, torchrun with 2
# ranks on GPUs 0-1 (rank 0 -> group 0, rank 1 -> group 1). Prints the NCCL transports and
# the trainers' last steps. On CPU (no GPU) the same command runs the services on the CPU.
#   bash benchmarks/device_two_groups.sh TOKENIZER_DIR DATA_DIR [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
tok=$1; data=$(realpath "$2"); work=${3:-/tmp/two-groups}
py=${PYTHON:-python3}
mkdir -p "$work/models" "$work/runs"
dev=$($py -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
T0=${T0:-2}; T1=${T1:-3}
[ -f "$work/models/teacher/config.json" ] || $py -m shared.tiny --output "$work/models/teacher" \
  --tokenizer "$tok" --hidden-size 512 --layers 4 --heads 8 --kv-heads 4 \
  --model-vocab-size 128256 --dtype bfloat16 --device "$dev" >/dev/null
envs=(--env MODELS_DIR="$work/models" --env TEACHER_MODEL=teacher --env DATA_DIR="$data"
      --env RUNS_DIR="$work/runs" --env RUN_NAME=two-groups --env GRAFANA_ADMIN_PASSWORD=unused
      --env DISTILL_CONFIG=configs/two_groups.yaml --env TEACHER_0_GPU="$T0" --env TEACHER_1_GPU="$T1"
      --env TRAINER_NPROC=2 --env NCCL_DEBUG=INFO --env NCCL_DEBUG_SUBSYS=INIT,P2P)
one=(--extra-args 'teacher-0=--link.trainers_per_group 1' --extra-args 'teacher-1=--link.trainers_per_group 1'
     --extra-args 'trainer=--link.trainers_per_group 1')
$py -m services.runner down -f compose.yaml --run-dir "$work/stack" >/dev/null 2>&1 || true
$py -m services.runner up -f compose.yaml --run-dir "$work/stack" --services teacher-0,teacher-1,trainer \
  "${envs[@]}" "${one[@]}" --wait --timeout 600
trap '$py -m services.runner down -f compose.yaml --run-dir "$work/stack" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 600); do
  $py -m services.runner status -f compose.yaml --run-dir "$work/stack" 2>/dev/null | grep -q "^trainer .*RUNNING" || break
  sleep 1
done
$py -m services.runner status -f compose.yaml --run-dir "$work/stack" || true
logs="$work/stack/logs"
echo "--- trainer (last lines)"; grep -E "trainer\[[01]\].*(joined|step 10/|done|Error)" "$logs"/trainer*.log | tail -8
echo "--- NCCL transports teacher<->trainer"
grep -ho "via [A-Z2]*/[A-Za-z0-9/]*" "$logs"/teacher-*.log | sort | uniq -c || echo "(none: Gloo on CPU)"
for g in 0 1; do
  echo "group $g: $(grep -c 'joined' "$logs"/teacher-$g*.log || true) join(s) seen by teacher-$g; steps on rank $g: $(wc -l < "$work/runs/two-groups/steps-rank$g.jsonl")"
done
