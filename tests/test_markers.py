"""The `services` marker is set from the fixtures a test uses, so `make test-fast` can skip it."""

from __future__ import annotations

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
