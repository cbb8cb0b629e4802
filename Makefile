# The two commands of the README, and the steps they are made of.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Exact versions CI installs, written by `make lock` (uv pip compile) from pyproject.toml's bounds.
LOCK := requirements/constraints.txt
# The Pythons chatchain is tested on besides $(PYTHON), the lowest supported (3.11), on which
# `make unit` runs every test: the fast tier runs on each of these too. Keep pyproject.toml's
# classifiers and the README's list the same.
NEWER_PYTHONS := 3.12 3.13

.PHONY: demo test check lint types unit newer test-pythons services bench lock test-latest test-lowest clean

# Set up (once, and again when pyproject.toml or the lock changes) and run the demo chat session.
# It needs only the package itself, not the test tools and database drivers.
demo: $(VENV)/.demo
	$(BIN)/python -m chatchain._demo

# Set up and run everything CI runs: format, lint, types, all tests on the lowest Python, and
# the fast tier on the newer ones.
test: check newer

check: $(VENV)/.installed lint types unit

lint: $(VENV)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

types: $(VENV)/.installed
	$(BIN)/mypy

# Coverage of chatchain; the run fails below [tool.coverage.report] fail_under in pyproject.toml.
unit: $(VENV)/.installed services
	$(BIN)/pytest --cov=chatchain --cov-report=term:skip-covered

# The developer's loop: unit, end-to-end and doctests without the slow tests (soak, load,
# processes, notebooks, builds) and without those that need Redis or PostgreSQL. A real
# `chatchain serve` runs in a few smoke tests only: the routes are tested in-process. On every
# core (pytest-xdist), each test file whole in one worker (a module's service starts once):
# ~2.5 minutes of CPU in all, so about 1.3 minutes on 2 quiet cores.
.PHONY: test-fast
test-fast: $(VENV)/.installed
	$(BIN)/pytest -q -m "not slow and not services" -n auto --dist loadfile

# The fast tier on each of NEWER_PYTHONS, in .venv-3.12, .venv-3.13...; each must be on the
# machine (pythonX.Y on PATH, or pyenv's).
newer:
	bash .ci/pythons --require $(NEWER_PYTHONS)

# The fast tier on every tested Python this machine has (those it lacks are skipped).
test-pythons: test-fast
	bash .ci/pythons $(NEWER_PYTHONS)

# Debian's redis-server and postgresql, which the store tests start on free ports,
# chromium + chromium-driver, the headless browser the page tests drive, and nginx, the proxy
# of the deployment test (started by the test, never as a system service).
services:
	bash .ci/services

# Every benchmark, then docs/benchmarks.md and its plots (~18 min; servers on 127.0.0.1 only).
bench: $(VENV)/.installed services
	$(BIN)/python benchmarks/report.py

$(VENV)/.demo: pyproject.toml $(LOCK)
	@echo "make demo: setting up $(VENV) with chatchain and its dependencies (once; about a minute)..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "make demo: installing chatchain (LangChain, OpenAI client, ...) at the versions of $(LOCK)..."
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e .
	@echo "make demo: $(VENV) is ready; starting the demo."
	touch $@

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[test]"
	touch $@

# A newer Python's environment, from the same lock; .ci/pythons passes the interpreter.
.venv-3.%/.installed: pyproject.toml $(LOCK)
	$${PYTHON_NEWER:?run it through .ci/pythons, which finds the interpreter} -m venv $(@D)
	$(@D)/bin/python -m pip install --quiet --upgrade pip
	$(@D)/bin/python -m pip install --quiet -c $(LOCK) -e ".[test]"
	touch $@

# Re-pin every dependency to the newest versions pyproject.toml allows (needs uv: pip install uv).
lock:
	uv pip compile pyproject.toml --all-extras --python-version 3.11 --upgrade --quiet -o $(LOCK)

# Drift checks, not in CI's path: lint and the whole suite against the newest and the lowest
# versions that pyproject.toml's bounds allow, each in its own virtual environment (types
# against the newest only; see .ci/drift).
test-latest: services
	bash .ci/drift latest

test-lowest: services
	bash .ci/drift lowest

clean:
	rm -rf $(VENV) .venv-3.* .venv-latest .venv-lowest .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
