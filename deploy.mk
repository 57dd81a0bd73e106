# Deployment targets (docs/deploy.md), included from the main Makefile.
#
#   make up / down / logs / ps    the stack in Docker (compose.yaml, settings in .env)
#   make up-cpu                   the same stack in Docker on a machine without a GPU, built
#                                 offline (compose.cpu.yaml, deploy/cpu.env); make down stops it
#   make images-cpu               only build its images (Debian bases, wheelhouse, the image)
#   make up-local / down-local    the same services without Docker (services/runner + supervisord)
#   make check-deploy             static checks: compose schema, hadolint, promtool
#
# Variables: SERVICE=teacher-0 (logs of one service); LOCAL_FILE=compose.demo.yaml (another
# compose file for up-local/down-local); LOCAL_ARGS='--services teacher-0 --env NCCL_DEBUG=INFO'
# (more runner options for up-local); LOCAL_RUN_DIR (default runs/local/<file stem>);
# CPU_TEACHER_STEPS (LM steps of up-cpu's tiny teacher, default 600; 0 keeps it random).

DEPLOY_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
RUNNER ?= $(DEPLOY_PYTHON) -m services.runner
COMPOSE ?= docker compose
COMPOSE_FILES ?= -f compose.yaml
SERVICE ?=
LOCAL_FILE ?= compose.yaml
LOCAL_RUN_DIR ?=
LOCAL_ARGS ?=
CPU_COMPOSE_FILES ?= --env-file deploy/cpu.env -f compose.yaml -f compose.cpu.yaml
CPU_RUN_DIR ?= runs/cpu
CPU_TEACHER_STEPS ?= 600
# down / logs / ps act on either stack: both have the same project and service names, and
# without .env only the CPU files interpolate (deploy/cpu.env sets every variable).
STACK_FILES = $(if $(wildcard .env),$(COMPOSE_FILES),$(CPU_COMPOSE_FILES))

_local_common = -f $(LOCAL_FILE) $(if $(LOCAL_RUN_DIR),--run-dir $(LOCAL_RUN_DIR))
_need_env = $(if $(filter compose.yaml,$(notdir $(LOCAL_FILE))),--require-env-file)

.PHONY: up up-cpu images-cpu down logs ps up-local down-local check-deploy

define _require_dotenv
	@test -f .env || { echo "error: .env is missing: run 'cp .env.example .env', then set MODELS_DIR, TEACHER_MODEL, DATA_DIR, RUNS_DIR and GRAFANA_ADMIN_PASSWORD in it (see docs/deploy.md)" >&2; exit 1; }
endef

# The three services share one image: build it once (compose would build it per service).
up:
	$(_require_dotenv)
	$(RUNNER) check $(COMPOSE_FILES) --require-env-file
	$(COMPOSE) $(COMPOSE_FILES) build trainer
	$(COMPOSE) $(COMPOSE_FILES) up -d

# Engine: installed (Debian's docker.io + the Compose plugin) and started when missing.
images-cpu: $(VENV_STAMP)
	$(DEPLOY_PYTHON) -m deploy.docker_engine ensure
	$(DEPLOY_PYTHON) -m deploy.docker_images
	$(COMPOSE) $(CPU_COMPOSE_FILES) build trainer

up-cpu: images-cpu
	$(DEPLOY_PYTHON) -m demo.prepare --run-dir $(CPU_RUN_DIR) \
	    --teacher-steps $(CPU_TEACHER_STEPS)
	$(COMPOSE) $(CPU_COMPOSE_FILES) up -d
	@echo "up-cpu: started; make ps, make logs SERVICE=trainer; make down stops it"

down:
	$(COMPOSE) $(STACK_FILES) down --remove-orphans

logs:
	$(COMPOSE) $(STACK_FILES) logs -f --tail=200 $(SERVICE)

ps:
	$(COMPOSE) $(STACK_FILES) ps

up-local:
	$(RUNNER) up $(_local_common) $(_need_env) $(LOCAL_ARGS)

down-local:
	$(RUNNER) down $(_local_common)

check-deploy:
	bash deploy/check_deploy.sh
