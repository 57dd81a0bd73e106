#!/usr/bin/env bash
# Static checks of the deployment files (make check-deploy); tools: .ci/install_tools.sh.
#   compose files against the compose-spec schema, hadolint on every Dockerfile,
#   promtool check config / check rules / test rules, and a render of each compose file by the
#   no-Docker runner (proves the runner reads them).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
bindir=$(dirname "$python")
export PATH="$bindir:$PATH"

need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "error: $1 not found; install the tools with: bash .ci/install_tools.sh" >&2
    exit 1
  }
}
need check-jsonschema; need hadolint; need promtool

echo "== compose-spec schema"
# compose.cpu.yaml uses !reset, which check-jsonschema cannot parse: Compose itself validates
# the merged files (tests/test_deploy_compose_config.py checks both).
for f in compose*.yaml; do
  case "$f" in compose.cpu.yaml) continue ;; esac
  check-jsonschema --builtin-schema vendor.compose-spec "$f"
done
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  docker compose --env-file deploy/cpu.env -f compose.yaml -f compose.cpu.yaml config --quiet \
    && echo "compose.yaml + compose.cpu.yaml: ok (docker compose config)"
fi

echo "== hadolint"
for f in docker/Dockerfile*; do
  case "$f" in *.dockerignore) continue ;; esac
  hadolint "$f" && echo "$f: ok"
done

echo "== promtool"
promtool check config deploy/prometheus/prometheus.yml deploy/prometheus/prometheus.demo.yml \
  deploy/prometheus/prometheus.cpu.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

echo "== runner render"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/models/m" "$tmp/data" "$tmp/runs"
for f in compose.yaml compose.demo.yaml; do
  "$python" -m services.runner render -f "$f" --run-dir "$tmp/run-$f" --env-file /dev/null \
    --env MODELS_DIR="$tmp/models" --env TEACHER_MODEL=m --env DATA_DIR="$tmp/data" \
    --env RUNS_DIR="$tmp/runs" >/dev/null
  echo "$f: rendered"
done
"$python" -m services.runner render -f compose.yaml -f compose.cpu.yaml --env-file deploy/cpu.env \
  --run-dir "$tmp/run-cpu" >/dev/null
echo "compose.yaml + compose.cpu.yaml: rendered"
echo "check-deploy: ok"
