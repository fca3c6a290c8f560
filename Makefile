# EdgeGLM — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: test test-unit test-integration bench bench-quick demo lint typecheck clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamps re-install when pyproject.toml changes.
# The CPU build of torch goes first: a plain `torch` pulls gigabytes of CUDA.
$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,export,agent,hub,bench]'
	touch $@

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q tests

test-unit: $(VENV)/.dev-installed
	$(PY) -m pytest -q tests/unit

test-integration: $(VENV)/.dev-installed
	$(PY) -m pytest -q tests/integration

bench: $(VENV)/.dev-installed
	mkdir -p bench/results
	$(PY) -m bench.delta --json bench/results/delta.json
	$(PY) -m bench.serve --json bench/results/serve.json
	$(PY) -m bench.fleet --json bench/results/fleet.json
	$(PY) -m bench.update --json bench/results/update.json
	$(PY) -m bench.cached_path --json bench/results/cached_path.json
	$(PY) -m bench.http_burst --json bench/results/http_burst.json
	$(PY) -m bench.structured --json bench/results/structured.json

bench-quick: $(VENV)/.dev-installed
	mkdir -p bench/results
	$(PY) -m bench.delta --quick --json bench/results/delta-quick.json
	$(PY) -m bench.serve --quick --json bench/results/serve-quick.json
	$(PY) -m bench.fleet --quick --json bench/results/fleet-quick.json
	$(PY) -m bench.update --quick --json bench/results/update-quick.json
	$(PY) -m bench.cached_path --quick --json bench/results/cached_path-quick.json
	$(PY) -m bench.http_burst --quick --json bench/results/http_burst-quick.json
	$(PY) -m bench.structured --quick --json bench/results/structured-quick.json

demo: $(VENV)/.dev-installed
	$(VENV)/bin/edgectl demo

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(VENV)/.dev-installed
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
