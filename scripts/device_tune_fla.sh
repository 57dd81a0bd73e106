#!/usr/bin/env bash
# fla's kernel configs for this GPU, in one device call (issue 10): tune on every GPU in parallel
# (one mixer per GPU), merge into shared/student/ops/fla_configs/<GPU>/, then time the first
# fwd+bwd on an empty Triton cache with those configs, as on a fresh node. The configs come back
# as $OUT/fla_configs.tgz (unpack at the repo root and commit).
#   bash scripts/device_tune_fla.sh [HEAD_SIZES...]      (default: 128 64)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-tune}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
sizes=${*:-128 64}
gpu=$($py -c "import torch; from shared.student.ops.fla_kernels import gpu_dir_name; print(gpu_dir_name(torch.cuda.get_device_name()))")
ngpu=$($py -c "import torch; print(torch.cuda.device_count())")
dest=shared/student/ops/fla_configs/$gpu
work=$(mktemp -d)
start=$(date +%s)
if [ "$ngpu" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout ${TUNE_LIMIT:-420} $py scripts/tune_fla.py tune --mixer rwkv7 --head-size $sizes --out "$work/rwkv7" >"$out/tune_rwkv7.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout ${TUNE_LIMIT:-420} $py scripts/tune_fla.py tune --mixer rwkv6 --head-size $sizes --out "$work/rwkv6" >"$out/tune_rwkv6.log" 2>&1 &
  wait
else
  timeout ${TUNE_LIMIT:-420} $py scripts/tune_fla.py tune --mixer rwkv7 rwkv6 --head-size $sizes --out "$work/rwkv7" >"$out/tune_rwkv7.log" 2>&1
fi
echo "tuning took $(( $(date +%s) - start )) s"; tail -n 5 "$out"/tune_*.log
# merge: same kernel name in both dirs -> union of entries (keys differ by shape/dtype)
$py - "$work" "$dest" <<'PY'
import json, sys
from pathlib import Path
work, dest = Path(sys.argv[1]), Path(sys.argv[2])
dest.mkdir(parents=True, exist_ok=True)
for f in sorted(work.glob("*/*.json")):
    target = dest / f.name
    data = json.loads(f.read_text())
    if target.is_file():
        old = json.loads(target.read_text())
        old["autotune_entries"].update(data["autotune_entries"])
        data = old
    target.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
print(f"{len(list(dest.glob('*.json')))} kernel config files in {dest}")
PY
tar czf "$out/fla_configs.tgz" "$dest"
timeout ${CHECK_LIMIT:-150} $py scripts/tune_fla.py check --mixer rwkv7 rwkv6 --head-size $sizes 2>&1 | tee "$out/check.log" | grep -v Warning
