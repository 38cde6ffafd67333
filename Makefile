# `make test` and `make demo` work on a fresh machine: they create .venv, install what is
# missing (torch pinned first, so pip takes the CPU wheel instead of a multi-GB download),
# make sure redis-server exists, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test lint demo install redis-server bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test,lint]'
	touch $(STAMP)

install: $(STAMP) redis-server

# The tests and the demo start their own redis-server on a free port; install it if missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found: installing it with apt-get"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null || \
	  { echo "could not install redis-server; install it with your package manager (e.g. apt-get install redis-server)"; exit 1; }; }

# ruff (style, bugs) and mypy (every package: see pyproject.toml) gate the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/lstream demo

bench: install
	$(BIN)/lstream bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
