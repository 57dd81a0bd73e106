# The CPU demo (docs/demo.md), included from the main Makefile.
#
#   make demo        tiny teacher + real-text C4 sample + the stack under supervisord
#                    (teacher, 2 trainer ranks, Prometheus): align, then kd, generation,
#                    summary. A few minutes on 2 cores; the stack is stopped at the end.
#   make demo-down   stop a demo left up with DEMO_ARGS=--keep-up
#
# Variables: DEMO_STEPS=N (optimizer steps per stage, read by demo/__main__.py),
# DEMO_ARGS='--keep-up --fresh --run-dir DIR ...' (python -m demo --help),
# DEMO_RUN_DIR (default runs/demo, for demo-down).

VENV_STAMP ?= .venv/.installed
PY ?= .venv/bin/python
DEMO_ARGS ?=
DEMO_RUN_DIR ?= runs/demo

.PHONY: demo demo-down

demo: $(VENV_STAMP)
	$(PY) -m demo $(DEMO_ARGS)

demo-down:
	$(PY) -m services.runner down -f compose.demo.yaml --run-dir $(DEMO_RUN_DIR)/stack
