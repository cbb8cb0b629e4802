# The two commands of the README, and the steps they are made of.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Exact versions CI installs, written by `make lock` (uv pip compile) from pyproject.toml's bounds.
LOCK := requirements/constraints.txt

.PHONY: demo test check lint types unit services bench lock test-latest test-lowest clean

# Set up (once, and again when pyproject.toml or the lock changes) and run the demo chat session.
# It needs only the package itself, not the test tools and database drivers.
demo: $(VENV)/.demo
	$(BIN)/python -m chatchain._demo

# Set up and run everything CI runs: format, lint, types, all tests.
test: check

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
# processes, notebooks, builds) and without those that need Redis or PostgreSQL.
.PHONY: test-fast
test-fast: $(VENV)/.installed
	$(BIN)/pytest -q -m "not slow and not services"

# Debian's redis-server and postgresql, which the store tests start on free ports, and
# chromium + chromium-driver, the headless browser the page tests drive.
services:
	bash .ci/services

# Every benchmark, then docs/benchmarks.md and its plots (~12 min; servers on 127.0.0.1 only).
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
	rm -rf $(VENV) .venv-latest .venv-lowest .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
