# make run [ARGS="overrides"]  |  make test  |  make lint
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint demo-source

# The venv is rebuilt whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(PY) -m pipeline $(ARGS)

# Two workers: much of a test's time is single-threaded (imports, tracing, subprocesses).
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check pipeline tests scripts hydra_plugins

demo-source: $(VENV)/.installed
	$(PY) scripts/build_demo_source.py
