# The two commands of the README, and the steps they are made of.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test check lint types unit services bench clean

# Set up (once, and again when pyproject.toml changes) and run the demo chat session.
demo: $(VENV)/.installed
	$(BIN)/python -m chatchain

# Set up and run everything CI runs: format, lint, types, all tests.
test: check

check: $(VENV)/.installed lint types unit

lint: $(VENV)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

types: $(VENV)/.installed
	$(BIN)/mypy

unit: $(VENV)/.installed services
	$(BIN)/pytest

# Debian's redis-server and postgresql, which the store tests start on free ports.
services:
	bash .ci/services

# Every benchmark, then docs/benchmarks.md and its plots (~12 min; servers on 127.0.0.1 only).
bench: $(VENV)/.installed services
	$(BIN)/python benchmarks/report.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
