"""The `services` marker is set from the fixtures a test uses, so `make test-fast` can skip it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SUITE = """
import pytest

@pytest.fixture
def redis_url():
    return "redis://"

@pytest.fixture
def postgres_store():
    return None

@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def store(request):
    return request.param

def test_plain():
    pass

def test_on_redis(redis_url):
    pass

def test_on_postgres(postgres_store):
    pass

def test_every_store(store):
    pass

@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_by_name(backend):
    pass

@pytest.mark.parametrize("fixture", ["sqlite_url", "postgres_url"])
def test_by_fixture_name(fixture):
    pass

@pytest.mark.parametrize("url", ["redis://cache:6379/0"])
def test_a_url_is_only_text(url):
    pass
"""


def test_tests_that_need_redis_or_postgres_are_marked_services(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\naddopts = --strict-markers\n"
        "markers =\n    services: needs servers\n"
    )
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems\n")
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest("-m", "not services", "--collect-only", "-q")
    kept = {line for line in result.outlines if "::" in line}
    assert kept == {
        "test_suite.py::test_plain",
        "test_suite.py::test_every_store[memory]",
        "test_suite.py::test_every_store[sqlite]",
        "test_suite.py::test_by_name[sqlite]",
        "test_suite.py::test_by_fixture_name[sqlite_url]",
        "test_suite.py::test_a_url_is_only_text[redis://cache:6379/0]",
    }


# The real `chatchain serve` tests (uvicorn processes) that stay in `make test-fast`: a smoke
# test of each surface only a real server shows, so that a broken `serve` shows in the
# developer's loop (and on the newer Pythons, which run the fast tier only). Every other test
# that starts a service is marked slow: its behaviour is tested in this process (FastAPI's
# TestClient) in the fast tier, and the whole suite (`make unit`) runs both. Each module kept
# here starts its own service (a few seconds of CPU): keep them few.
SERVE_SMOKE = {
    # A turn through a real process, counted by prometheus-client's multiprocess mode.
    "test_metrics.py": {"test_metrics_count_turns_tokens_cost_latency_and_errors_by_class"},
    # A client that leaves before the reply began, and the header's raw bytes.
    "test_service_edges.py": {
        "test_a_client_that_leaves_before_the_reply_began_is_abandoned_not_interrupted",
        "test_a_utf8_session_header_names_the_same_session_as_the_url_path",
        "test_a_session_header_that_is_not_utf8_is_refused_before_any_call",
    },
}
SERVER_TESTS = Path(__file__).parent / "server"


def _starters(tree: ast.Module, known: set[str]) -> set[str]:
    """Names of the module's functions that start a service, directly or through fixtures."""
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    found = set(known)
    while True:
        more = {
            f.name
            for f in functions
            if f.name not in found
            and (
                any(a.arg in found for a in f.args.args)
                or any(
                    isinstance(c, ast.Call) and getattr(c.func, "id", "") == "start_service"
                    for c in ast.walk(f)
                )
            )
        }
        if not more:
            return found
        found |= more


def _is_slow(function: object, module: object) -> bool:
    """Whether the test or its module carries `pytest.mark.slow` (a mark or a list of them)."""
    marks = []
    for holder in (module, function):
        held = getattr(holder, "pytestmark", [])
        marks += held if isinstance(held, list) else [held]
    return any(mark.name == "slow" for mark in marks)


def test_tests_that_start_chatchain_serve_are_slow_but_the_smoke_tests() -> None:
    conftest = ast.parse((SERVER_TESTS / "conftest.py").read_text())
    shared = _starters(conftest, {"start_service"}) - {"start_service"}
    unmarked = []
    for path in sorted(SERVER_TESTS.glob("test_*.py")):
        module = importlib.import_module(f"tests.server.{path.stem}")
        starters = _starters(ast.parse(path.read_text()), shared)
        for name in sorted(n for n in starters if n.startswith("test_")):
            smoke = SERVE_SMOKE.get(path.name, set())
            if not _is_slow(getattr(module, name), module) and not {"*", name} & smoke:
                unmarked.append(f"{path.name}::{name}")
    assert shared >= {"service", "user", "other"}
    assert unmarked == [], "mark these @pytest.mark.slow, or add them to SERVE_SMOKE"


def test_the_serve_smoke_tests_run_in_the_fast_tier() -> None:
    for file, names in SERVE_SMOKE.items():
        module = importlib.import_module(f"tests.server.{Path(file).stem}")
        for name in sorted(names - {"*"}):
            assert not _is_slow(getattr(module, name), module), f"{file}::{name} is marked slow"
