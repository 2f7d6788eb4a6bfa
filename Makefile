# Two entry points that work on a fresh clone with only Python 3.10+ installed:
#   make serve   serve the shipped models (a torch-free virtual environment, .venv-serve)
#   make test    lint and run the whole test suite (a full development environment, .venv)
PYTHON ?= python3
PORT ?= 3000
SERVE_VENV := .venv-serve
DEV_VENV := .venv

.PHONY: serve test lint loadtest bench bento

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/bentoml serve serving.service:ImageAI --host 0.0.0.0 --port $(PORT)

test: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check .
	$(DEV_VENV)/bin/python -m pytest

# Locust scenarios for every model against a service it starts and stops itself, e.g.
#   make loadtest LOADTEST_ARGS="--users 16 --duration 5m --images ../shared/datasets/chest_xray/train/NORMAL"
loadtest: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python load_tests/run_load.py $(LOADTEST_ARGS)

# Throughput against the limit and a naive server (needs Debian's wrk); training: load_tests/train_bench.py
bench: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python load_tests/bench.py --out runs/bench.json $(BENCH_ARGS)

bento: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/bentoml build

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q -e ".[serving]"
	touch $@

$(DEV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install -q --upgrade pip
	$(DEV_VENV)/bin/pip install -q -e ".[training,serving,loadtest,tensorboard,dev]"
	touch $@
