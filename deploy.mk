# Deployment targets (docs/deploy.md), included from the main Makefile.
#
#   make up / down / logs / ps    the stack in Docker (compose.yaml, settings in .env)
#   make up-local / down-local    the same services without Docker (services/runner + supervisord)
#   make check-deploy             static checks: compose schema, hadolint, promtool
#
# Variables: SERVICE=teacher-0 (logs of one service); LOCAL_FILE=compose.demo.yaml (another
# compose file for up-local/down-local); LOCAL_ARGS='--services teacher-0 --env NCCL_DEBUG=INFO'
# (more runner options for up-local); LOCAL_RUN_DIR (default runs/local/<file stem>).

DEPLOY_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
RUNNER ?= $(DEPLOY_PYTHON) -m services.runner
COMPOSE ?= docker compose
COMPOSE_FILES ?= -f compose.yaml
SERVICE ?=
LOCAL_FILE ?= compose.yaml
LOCAL_RUN_DIR ?=
LOCAL_ARGS ?=

_local_common = -f $(LOCAL_FILE) $(if $(LOCAL_RUN_DIR),--run-dir $(LOCAL_RUN_DIR))
_need_env = $(if $(filter compose.yaml,$(notdir $(LOCAL_FILE))),--require-env-file)

.PHONY: up down logs ps up-local down-local check-deploy

define _require_dotenv
	@test -f .env || { echo "error: .env is missing: run 'cp .env.example .env', then set MODELS_DIR, TEACHER_MODEL, DATA_DIR, RUNS_DIR and GRAFANA_ADMIN_PASSWORD in it (see docs/deploy.md)" >&2; exit 1; }
endef

up:
	$(_require_dotenv)
	$(RUNNER) check $(COMPOSE_FILES) --require-env-file
	$(COMPOSE) $(COMPOSE_FILES) up -d --build

down:
	$(COMPOSE) $(COMPOSE_FILES) down

logs:
	$(COMPOSE) $(COMPOSE_FILES) logs -f --tail=200 $(SERVICE)

ps:
	$(COMPOSE) $(COMPOSE_FILES) ps

up-local:
	$(RUNNER) up $(_local_common) $(_need_env) $(LOCAL_ARGS)

down-local:
	$(RUNNER) down $(_local_common)

check-deploy:
	bash scripts/check_deploy.sh
