# rfm-stream: every target sets up what it needs (a virtualenv in .venv) by itself.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# what is installed, per pyproject.toml version: the demo needs the project and its local
# stack (the extra "local"); tests, lint and benchmarks also need the extra "test"
CKSUM := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
LOCAL := $(VENV)/.installed-local-$(CKSUM)
STAMP := $(VENV)/.installed-test-$(CKSUM)

.PHONY: venv demo test test-unit lint schemas bench bench-all clean

$(BIN)/python:
	@test -n "$(PY)" || { echo "Python 3.11 is required (python3.11 not found)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(LOCAL): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[local]'
	@rm -f $(VENV)/.installed-local-*
	@touch $(LOCAL)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP) $(LOCAL)

venv: $(STAMP)

## make demo: the whole pipeline on the CDNOW purchases, on the embedded local stack
demo: $(LOCAL)
	$(BIN)/rfm-stream demo --out out/demo

## make test: the whole suite (unit, integration against real servers, e2e)
test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit stream state

lint: $(STAMP)
	$(BIN)/ruff check stream state tests bench

schemas: $(STAMP)
	$(BIN)/rfm-stream schemas docs/schemas

## make bench: worker throughput on the CDNOW load against an empty faust agent and a raw
## aiokafka consumer measured in the same run, as ratios (prints figures; not a test)
bench: $(STAMP)
	$(BIN)/python bench/worker_throughput.py

## make bench-all: every benchmark (bench/README.md): throughput, latency, replay, Redis memory
## over 1M customers (both population layouts) and what each layout costs Redis, worker RSS soak, sweep over 1M customers, clustering
bench-all: bench
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/replay_throughput.py
	$(BIN)/python bench/redis_memory.py
	$(BIN)/python bench/redis_memory.py --layout sorted_sets
	$(BIN)/python bench/layout_cost.py
	$(BIN)/python bench/rss_soak.py
	$(BIN)/python bench/sweep_cost.py
	$(BIN)/python bench/clustering_cost.py
	$(BIN)/python bench/pipeline_cpu.py

clean:
	rm -rf $(VENV) out .pytest_cache
