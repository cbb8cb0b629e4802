"""Bad input, generated: each is stored and returned exactly, or refused and nothing is stored.

Hypothesis drives any Unicode text (lone surrogates, NUL, controls, line separators, braces),
hostile session ids (SQL, Redis key metacharacters, path separators, percent signs, look-alike
Unicode) and odd prompt variables (braces, missing, extra, not strings) through `Chatbot`
on the memory and SQLite stores, and the session ids also through Redis and PostgreSQL (fewer
examples). The rules are the documented ones (`chatchain._turn.validate_session_id`): text
must not be blank, hold NUL or a lone surrogate; ids must not be blank, over 256 characters,
or hold control characters, surrogates or line/paragraph separators. Each test checks that a
refusal happens exactly when a rule says so, and that a refused turn sends, stores and records
nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatchain import Chatbot, InvalidInputError, MissingPromptVariableError, Settings
from chatchain.stores import HistoryStore
from chatchain.testing import FakeChatModel
from tests.reliability.conftest import assert_no_hold_left

SYSTEM = "You are a {role}. Answer in {language}."
VARS = {"role": "helpful assistant", "language": "English"}
FORBIDDEN_IN_IDS = frozenset({"Cc", "Cs", "Zl", "Zp"})

LOCAL = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SERVERS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

fresh = itertools.count()


def new_session() -> str:
    return f"session-{next(fresh)}"


def make_bot(store: str | HistoryStore, **overrides: Any) -> tuple[Chatbot, FakeChatModel]:
    values: dict[str, Any] = {
        "api_key": "sk-test",
        "model": "gpt-4o-mini",
        "window_turns": None,
        "window_tokens": None,
        "summarize": False,
        "budget_session_tokens": 10**12,  # every turn takes a hold, so a leftover would show
        "max_tokens": 10**6,  # under a budget replies are otherwise cut at 1,000 tokens
    }
    values.update(overrides)
    if isinstance(store, str):
        values["store_url"] = store
    fake = FakeChatModel()
    bot = Chatbot(
        Settings(**values),
        llm=fake,
        store=None if isinstance(store, str) else store,
        system=SYSTEM,
        prompt_vars=VARS,
    )
    return bot, fake


@pytest.fixture(params=["memory", "sqlite"])
def local(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Chatbot, FakeChatModel]]:
    """One bot for all of a test's examples; each example uses sessions of its own."""
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'bad.db'}"
    bot, fake = make_bot(url)
    yield bot, fake
    bot.close()


def turn(bot: Chatbot, mode: str, text: str, session_id: str, **prompt_vars: Any) -> str:
    if mode == "chat":
        return bot.chat(text, session_id=session_id, **prompt_vars).text
    if mode == "stream":
        return "".join(bot.stream(text, session_id=session_id, **prompt_vars))
    return asyncio.run(bot.achat(text, session_id=session_id, **prompt_vars)).text


def assert_refused_cleanly(
    bot: Chatbot, fake: FakeChatModel, calls: int, session_id: str, stored: list[Any]
) -> None:
    assert len(fake.calls) == calls  # nothing sent
    assert bot.store.load(session_id) == stored  # nothing stored
    assert bot.usage_entries(session_id=session_id) == []  # nothing recorded


# -- text ---------------------------------------------------------------------------------------

ANY_CHAR = st.one_of(
    st.characters(exclude_categories=()),  # all of Unicode, as Python holds it
    st.characters(categories=["Cs"]),  # lone surrogates, which the above rarely draws
    st.sampled_from("\x00\x1b\x7f\r\n\t\u2028\u2029\ufeff\u202e{}"),
)


def text_ok(text: str) -> bool:
    """Whether a message can be sent and stored (the documented rules)."""
    return bool(text.strip()) and "\x00" not in text and not _has_surrogate(text)


def _has_surrogate(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cs" for ch in text)


@pytest.mark.slow  # hypothesis
@LOCAL
@given(text=st.text(ANY_CHAR, max_size=60), mode=st.sampled_from(["chat", "stream", "achat"]))
@example(text="\x1b[31mred\x1b[0m\r\nnext line\u2028\ttab \x7f", mode="chat")
@example(text="{input} {history} {{role}} }{ {0} %s", mode="stream")
@example(text="hi \ud800 there", mode="chat")
@example(text="nul \x00 inside", mode="achat")
@example(text=" \t\n\u3000", mode="chat")
@example(text="🙂 名前 é é \ufeff\u202e", mode="achat")
def test_any_text_is_stored_exactly_or_refused(
    local: tuple[Chatbot, FakeChatModel], text: str, mode: str
) -> None:
    bot, fake = local
    session_id, calls = new_session(), len(fake.calls)
    if not text_ok(text):
        with pytest.raises(InvalidInputError):
            turn(bot, mode, text, session_id)
        assert_refused_cleanly(bot, fake, calls, session_id, [])
        assert_no_hold_left(bot, session_id)
        return
    reply = turn(bot, mode, text, session_id)
    assert reply == f"Echo: {text}"
    human, ai = bot.store.load(session_id)
    assert (human.type, human.content, ai.type, ai.content) == ("human", text, "ai", reply)
    assert fake.calls[-1][-1].content == text  # sent as it was typed
    assert bot.usage(session_id).turns == 1


@pytest.mark.slow  # a megabyte streamed back as ~400,000 chunks; small inputs: tests/test_window.py
@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_a_megabyte_is_refused_under_a_token_window_and_kept_exactly_without(
    store_kind: str, tmp_path: Path
) -> None:
    url = "memory://" if store_kind == "memory" else f"sqlite:///{tmp_path / 'big.db'}"
    text = ("All work and no play makes Jack a dull boy. 🙂\n" * 22_000)[:1_000_000]

    windowed, fake = make_bot(url, window_turns=6, window_tokens=3000)
    with pytest.raises(InvalidInputError, match="CHATCHAIN_WINDOW_TOKENS"):
        windowed.chat(text, session_id="big")
    with pytest.raises(InvalidInputError, match="CHATCHAIN_WINDOW_TOKENS"):
        "".join(windowed.stream(text, session_id="big"))
    assert_refused_cleanly(windowed, fake, 0, "big", [])
    assert_no_hold_left(windowed, "big")
    windowed.close()

    unbounded, fake = make_bot(url)
    reply = unbounded.chat(text, session_id="big")
    human, ai = unbounded.store.load("big")
    assert human.content == text and ai.content == reply.text == f"Echo: {text}"
    assert len(fake.calls) == 1
    unbounded.close()


# -- session ids --------------------------------------------------------------------------------

HOSTILE_IDS = [
    "'; DROP TABLE messages; --",
    '" OR 1=1 --',
    "*",
    "s:*",
    "chatchain:msgs:s",
    "{s}",
    "{a}:b[c]?",
    "../../etc/passwd",
    "..\\..\\windows",
    "/",
    "%41",
    "A",
    "%",
    "é",  # U+00E9
    "e\u0301",  # e + combining acute: looks the same, is another id
    " s",
    "s ",
    "s",
    "x" * 256,
    "x" * 257,
    "",
    "   ",
    "bad\nid",
    "bad\u2028id",
    "nul\x00id",
    "surrogate\ud800id",
    "\u202eevil",
    "🙂",
]

IDS = st.one_of(
    st.sampled_from(HOSTILE_IDS),
    st.text(ANY_CHAR, max_size=20),
    st.text(st.characters(codec="ascii"), min_size=250, max_size=260),
)


def id_ok(session_id: str) -> bool:
    return (
        bool(session_id.strip())
        and len(session_id) <= 256
        and not any(unicodedata.category(ch) in FORBIDDEN_IN_IDS for ch in session_id)
    )


def check_ids_apart(bot: Chatbot, fake: FakeChatModel, ids: list[str]) -> None:
    """Each id gets its own turn and nothing else, or is refused; the session list is exact."""
    sessions_before = set(bot.sessions())
    for index, session_id in enumerate(ids):
        calls = len(fake.calls)
        if not id_ok(session_id):
            with pytest.raises(InvalidInputError):
                bot.chat(f"message {index}", session_id=session_id)
            assert len(fake.calls) == calls
            continue
        bot.chat(f"message {index}", session_id=session_id)
    accepted = [(i, sid) for i, sid in enumerate(ids) if id_ok(sid)]
    for index, session_id in accepted:
        history = bot.store.load(session_id)
        assert [(m.type, m.text) for m in history] == [
            ("human", f"message {index}"),
            ("ai", f"Echo: message {index}"),
        ], session_id
        assert bot.usage(session_id).turns == 1
        assert [e.session_id for e in bot.usage_entries(session_id=session_id)] == [session_id]
        exported = bot.export_session(session_id)
        assert exported["session_id"] == session_id
    assert set(bot.sessions()) - sessions_before == {sid for _, sid in accepted}
    for _, session_id in accepted:
        bot.delete(session_id)
        assert bot.store.load(session_id) == []


@pytest.mark.slow  # hypothesis
@LOCAL
@given(ids=st.lists(IDS, min_size=1, max_size=5, unique=True))
@example(ids=HOSTILE_IDS)
def test_session_ids_are_kept_apart_exactly_or_refused(
    tmp_path: Path, store_kind: str, ids: list[str]
) -> None:
    # A fresh store per example: the ledger of an id must hold only this example's turn.
    url = "memory://" if store_kind == "memory" else f"sqlite:///{tmp_path / new_session()}.db"
    bot, fake = make_bot(url)
    try:
        check_ids_apart(bot, fake, ids)
    finally:
        bot.close()


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["redis", "postgres"])
def server_store(request: pytest.FixtureRequest) -> HistoryStore:
    store: HistoryStore = request.getfixturevalue(f"{request.param}_store")
    return store


@SERVERS
@given(ids=st.lists(IDS, min_size=1, max_size=4, unique=True))
@example(ids=HOSTILE_IDS)
def test_session_ids_are_kept_apart_on_redis_and_postgres(
    server_store: HistoryStore, ids: list[str]
) -> None:
    # The server store is shared by the examples: wipe what an earlier example left.
    for session_id in server_store.sessions():
        server_store.delete(session_id)
    bot, _ = make_bot(server_store)
    entries_before = {sid: len(bot.usage_entries(session_id=sid)) for sid in ids if id_ok(sid)}
    for session_id in ids:
        if not id_ok(session_id):
            with pytest.raises(InvalidInputError):
                bot.chat("hi", session_id=session_id)
            continue
        bot.chat(f"for {session_id!r}", session_id=session_id)
    for session_id in ids:
        if not id_ok(session_id):
            continue
        history = bot.store.load(session_id)
        assert [(m.type, m.text) for m in history] == [
            ("human", f"for {session_id!r}"),
            ("ai", f"Echo: for {session_id!r}"),
        ], session_id
        entries = bot.usage_entries(session_id=session_id)
        assert len(entries) == entries_before[session_id] + 1
        assert {e.session_id for e in entries} == {session_id}
    assert set(bot.sessions()) == {sid for sid in ids if id_ok(sid)}


# -- prompt variables ---------------------------------------------------------------------------

VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["{language}", "{input}", "{{x}}", "}{", "{0}", "{role!r}", "%(x)s"]),
    st.integers(),
    st.floats(allow_nan=False),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
EXTRA_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda name: name not in {"role", "language", "input", "history", "session_id", "user_id"}
)


@pytest.mark.slow  # hypothesis
@LOCAL
@given(
    role=VALUES,
    language=VALUES,
    extra=st.dictionaries(EXTRA_NAMES, VALUES, max_size=3),
    text=st.text(min_size=1, max_size=20).filter(text_ok),
)
@example(role="{language}", language="{input} {{x}} }{", extra={"unused": "{role}"}, text="hi")
def test_prompt_variables_are_sent_literally_and_the_turn_stored_exactly(
    local: tuple[Chatbot, FakeChatModel],
    role: Any,
    language: Any,
    extra: dict[str, Any],
    text: str,
) -> None:
    bot, fake = local
    session_id = new_session()
    reply = bot.chat(text, session_id=session_id, role=role, language=language, **extra)
    system = fake.calls[-1][0]
    # Values go in as they are (their str()), never formatted a second time.
    assert system.content == f"You are a {role}. Answer in {language}."
    assert [(m.type, m.content) for m in bot.store.load(session_id)] == [
        ("human", text),
        ("ai", reply.text),
    ]


def test_a_missing_prompt_variable_is_refused_and_nothing_is_stored(
    local: tuple[Chatbot, FakeChatModel],
) -> None:
    _, fake = local
    bot = Chatbot(
        Settings(api_key="sk-test", window_turns=None, window_tokens=None, summarize=False),
        llm=fake,
        store=local[0].store,
        system=SYSTEM,
        prompt_vars={"role": "helper"},  # no default for {language}
    )
    calls = len(fake.calls)
    for call in (
        lambda: bot.chat("hi", session_id="m"),
        lambda: "".join(bot.stream("hi", session_id="m")),
        lambda: asyncio.run(bot.achat("hi", session_id="m")),
    ):
        with pytest.raises(MissingPromptVariableError, match=r"\{language\}"):
            call()
    assert_refused_cleanly(bot, fake, calls, "m", [])
    bot.chat("hi", session_id="m", language="Latin")
    assert fake.calls[-1][0].content == "You are a helper. Answer in Latin."
