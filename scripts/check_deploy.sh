#!/usr/bin/env bash
# Static checks of the deployment files (make check-deploy); tools: scripts/install_ci_tools.sh.
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
    echo "error: $1 not found; install the tools with: bash scripts/install_ci_tools.sh" >&2
    exit 1
  }
}
need check-jsonschema; need hadolint; need promtool

echo "== compose-spec schema"
for f in compose*.yaml; do check-jsonschema --builtin-schema vendor.compose-spec "$f"; done

echo "== hadolint"
for f in docker/Dockerfile*; do
  case "$f" in *.dockerignore) continue ;; esac
  hadolint "$f" && echo "$f: ok"
done

echo "== promtool"
promtool check config deploy/prometheus/prometheus.yml deploy/prometheus/prometheus.demo.yml
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
echo "check-deploy: ok"
