# The two commands of the README. Each one creates .venv/ and installs what it needs first, from the lock.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch, installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
PIP := pip==26.3

.PHONY: demo test lint install lock clean

# requirements.lock: the exact versions CI tested (torch aside, installed first); pyproject.toml keeps the ranges.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pixart demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Refresh the lock: resolve pyproject.toml's ranges afresh in a scratch venv, pin what was installed.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q $(PIP)
	.lock-venv/bin/pip install -q $(TORCH)
	.lock-venv/bin/pip install -q '.[dev]'
	{ echo "# Exact versions of pyproject.toml's dependencies (and dev extras) as CI tested them: 'make lock' refreshes it."; \
	  echo "# torch is installed before this file (Makefile TORCH: its CPU build)."; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -v -E '^(torch|pixart-pipeline)=='; } > requirements.lock
	rm -rf .lock-venv build

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
