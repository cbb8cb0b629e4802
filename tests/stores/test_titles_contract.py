"""The titles half of the store contract (`TitleBackend`), run against every built-in store:
memory, SQLite, Redis and PostgreSQL, each on a real server."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage

from chatchain.stores import HistoryStore, TitleBackend

TITLE_BACKENDS = ["memory", "sqlite", "redis", "postgres"]


@pytest.fixture(params=TITLE_BACKENDS)
def store(request: pytest.FixtureRequest) -> HistoryStore:
    """A fresh, empty store of each built-in backend."""
    return request.getfixturevalue(f"{request.param}_store")  # type: ignore[no-any-return]


@pytest.fixture
def backend(store: HistoryStore) -> TitleBackend:
    assert isinstance(store, TitleBackend)
    return store


def test_titles_are_set_replaced_and_removed(backend: TitleBackend) -> None:
    assert backend.titles(["ann:a", "ann:b"]) == {}
    backend.set_title("ann:a", "Trip to Oslo")
    backend.set_title("ann:b", "Ünïcode 🚀 'quotes'; DROP TABLE x")
    backend.set_title("ann:a", "Trip to Bergen")
    assert backend.titles(["ann:a", "ann:b", "ann:c"]) == {
        "ann:a": "Trip to Bergen",
        "ann:b": "Ünïcode 🚀 'quotes'; DROP TABLE x",
    }
    backend.set_title("ann:a", None)
    backend.set_title("ann:never", None)  # removing a title that is not there is fine
    assert backend.titles(["ann:a", "ann:b"]) == {"ann:b": "Ünïcode 🚀 'quotes'; DROP TABLE x"}
    assert backend.titles([]) == {}


def test_a_title_leaves_the_session_as_it_was(store: HistoryStore) -> None:
    store.append("ann:a", [HumanMessage("hi")])
    before = store.info("ann:a")
    assert isinstance(store, TitleBackend)
    store.set_title("ann:a", "Greetings")
    assert store.info("ann:a") == before
    assert store.load("ann:a") == [HumanMessage("hi")]
    assert store.sessions() == ["ann:a"]


def test_many_titles_are_read_at_once(backend: TitleBackend) -> None:
    ids = [f"ann:s{i}" for i in range(1200)]  # past SQLite's parameters per statement
    for sid in ids[::100]:
        backend.set_title(sid, sid.upper())
    assert backend.titles(ids) == {sid: sid.upper() for sid in ids[::100]}
