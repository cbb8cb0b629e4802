"""A store that implements only part of the contract, completed by `as_store`; lazy exports.

The contract suite runs the example store of docs/writing-a-store.md as the ``example``
backend; these tests cover what is particular to it: the docs show it word for word, the
chain and the chatbot accept it as it is, and a backend's own parts are used when it has them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage

import chatchain.stores
from chatchain import Chatbot, HistoryWindow, Settings, create_chat_chain
from chatchain.errors import ConfigurationError
from chatchain.stores import (
    MemoryStore,
    Summary,
    SummaryBackend,
    as_store,
    open_store,
)
from chatchain.stores._composed import ComposedStore
from chatchain.testing import FakeChatModel
from chatchain.usage import UsageEntry
from tests.stores import example_store
from tests.stores.example_store import TinyStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny() -> Iterator[TinyStore]:
    """The example store on its own in-memory database, closed after the test."""
    backend = TinyStore()
    yield backend
    backend.close()


def test_the_docs_show_the_example_store_word_for_word_in_under_60_lines() -> None:
    page = (ROOT / "docs" / "writing-a-store.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    source = Path(example_store.__file__).read_text(encoding="utf-8")
    assert source in blocks
    assert len(source.splitlines()) < 60


def test_a_full_store_is_returned_as_it_is() -> None:
    store = MemoryStore()
    assert as_store(store) is store


def test_a_history_only_store_is_completed_in_this_process(tiny: TinyStore) -> None:
    store = as_store(tiny, lock_timeout=1.0)
    assert isinstance(store, ComposedStore)
    store.append("s", [HumanMessage("hi"), AIMessage("hello")])
    store.set_summary("s", Summary("greetings", 2))
    store.record_usage(UsageEntry("s", "m", total_tokens=5))
    assert store.usage_total("session", "s").total_tokens == 5
    store.delete("s")
    assert (store.count("s"), store.get_summary("s"), store.info("s")) == (0, None, None)
    assert store.usage_total("session", "s").total_tokens == 5  # what it spent stays


def test_a_chain_runs_on_a_history_only_store_with_a_window_and_a_summary(
    settings: Settings, tiny: TinyStore
) -> None:
    backend = tiny
    chain = create_chat_chain(
        FakeChatModel(),
        settings=settings,
        get_session_history=backend,
        window=HistoryWindow(max_turns=1, max_tokens=None, summarize=True),
    )
    config = {"configurable": {"session_id": "s1"}}
    for i in range(5):
        chain.invoke({"input": f"turn {i}"}, config=config)
    assert [m.content for m in backend.load("s1", -2)] == ["turn 4", "Echo: turn 4"]
    assert backend.count("s1") == 10  # the full transcript, in the backend
    store = chain.ledger.store  # the chain's store: the backend, completed in this process
    assert isinstance(store, ComposedStore)
    assert store.backend is backend
    summary = store.get_summary("s1")
    assert summary is not None
    assert summary.covers >= 2  # the turns that left the window are summarised
    assert store.usage_total("session", "s1").turns == 5


def test_a_chatbot_runs_on_a_history_only_store(settings: Settings, tiny: TinyStore) -> None:
    backend = tiny
    bot = Chatbot(settings, llm=FakeChatModel(), store=backend)
    assert bot.chat("hi", session_id="s1").text == "Echo: hi"
    assert backend.count("s1") == 2
    info = bot.session_info("s1")
    assert info is not None
    assert info.message_count == 2
    assert bot.usage("s1").turns == 1


class _WithSummary(TinyStore, SummaryBackend):
    """A backend that keeps its own summaries."""

    def __init__(self) -> None:
        super().__init__()
        self.summaries: dict[str, Summary] = {}

    def get_summary(self, session_id: str) -> Summary | None:
        return self.summaries.get(session_id)

    def set_summary(self, session_id: str, summary: Summary) -> None:
        self.summaries[session_id] = summary


def test_a_backends_own_parts_are_used_when_it_has_them() -> None:
    backend = _WithSummary()
    with closing(as_store(backend)) as store:  # closes the backend's database too
        store.set_summary("s", Summary("kept by the backend", 4))
        assert backend.summaries == {"s": Summary("kept by the backend", 4)}
        assert store.get_summary("s") == Summary("kept by the backend", 4)


def test_the_concrete_stores_are_exported_lazily() -> None:
    from chatchain.stores._postgres import PostgresStore
    from chatchain.stores._redis import RedisStore
    from chatchain.stores._sqlite import SQLiteStore

    assert chatchain.stores.SQLiteStore is SQLiteStore
    assert chatchain.stores.RedisStore is RedisStore
    assert chatchain.stores.PostgresStore is PostgresStore
    with pytest.raises(AttributeError, match="NoSuchStore"):
        _ = chatchain.stores.NoSuchStore  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url_fixture", "options"),
    [
        ("sqlite_url", {"lease": 7.0}),
        ("redis_url", {"prefix": "other", "lease": 9.0}),
        ("postgres_url", {"table_prefix": "optioned", "max_size": 3}),
    ],
)
def test_open_store_passes_the_stores_options(
    request: pytest.FixtureRequest, url_fixture: str, options: dict[str, Any]
) -> None:
    store = open_store(request.getfixturevalue(url_fixture), lock_timeout=2.0, **options)
    try:
        kept = {name: getattr(store, name) for name in options if name != "max_size"}
        assert kept == {name: value for name, value in options.items() if name != "max_size"}
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "option", "says"),
    [
        ("memory://", "lease", "its options: none"),
        ("sqlite:///x.db", "prefix", "its options: lease"),
    ],
)
def test_an_option_the_store_lacks_is_refused_clearly(url: str, option: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=f"no option {option} .*{says}"):
        open_store(url, **{option: 1})


def test_a_missing_postgres_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg_pool", None)
    with pytest.raises(ConfigurationError, match=re.escape("pip install 'chatchain[postgres]'")):
        open_store("postgresql://nobody@127.0.0.1:1/none")


def test_the_docs_commit_watch_sees_each_write_of_the_example_store(
    settings: Settings, tiny: TinyStore
) -> None:
    page = (ROOT / "docs" / "writing-a-store.md").read_text(encoding="utf-8")
    (block,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
        if "class CommitWatch" in block
    ]
    namespace: dict[str, Any] = {}
    exec(compile(block, "writing-a-store.md", "exec"), namespace)
    watch = namespace["CommitWatch"]()
    bot = Chatbot(settings, llm=FakeChatModel(), store=tiny, hooks=watch)
    bot.chat("hi", session_id="s1")
    bot.chat("again", session_id="s1")
    assert len(watch.seconds) == 2
    assert all(seconds >= 0 for seconds in watch.seconds)
    assert watch.failures == []
    assert tiny.count("s1") == 4
