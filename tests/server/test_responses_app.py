"""The Responses API in this process (FastAPI's TestClient, the ``openai`` SDK's
``client.responses`` over it, a FakeChatModel), over every store: a response belongs to a
session of the caller; continuing from the newest response continues the session, from an
older one forks; GET, input_items, DELETE; store=false; the streamed events; another user's
id is 404. The Agents SDK over a real ``chatchain serve`` is in test_responses_agents.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from langchain_core.messages import AIMessage, BaseMessage

from chatchain import Chatbot, Settings, errors
from chatchain.server import create_app
from chatchain.server._responses import ResponseId
from chatchain.stores import HistoryStore, MemoryStore
from chatchain.testing import FakeChatModel, tool_call_reply
from chatchain.users import Users
from tests.stores.fixtures_postgres import postgres_store, postgres_url
from tests.stores.fixtures_redis import redis_store, redis_url
from tests.stores.fixtures_sqlite import sqlite_store, sqlite_url

# The backends' fixtures, used here by name.
__all__ = [
    "postgres_store",
    "postgres_url",
    "redis_store",
    "redis_url",
    "sqlite_store",
    "sqlite_url",
]


@pytest.fixture
def memory_store() -> Iterator[HistoryStore]:
    store = MemoryStore(lock_timeout=1.0)
    yield store
    store.close()


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def store(request: pytest.FixtureRequest) -> HistoryStore:
    """A fresh store of each backend (real servers and files)."""
    return request.getfixturevalue(f"{request.param}_store")  # type: ignore[no-any-return]


class Seen:
    """What the model was sent, call by call (a FakeChatModel's ``respond``)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []
        self.script: list[str | AIMessage] = []  # replies to give first, in order

    def __call__(self, messages: list[BaseMessage]) -> str | AIMessage:
        self.calls.append([(m.type, m.text) for m in messages])
        return self.script.pop(0) if self.script else f"Echo: {messages[-1].text}"


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def fake_calls(seen: Seen) -> None:
    """The model calls get_weather for Oslo, then answers from the result."""
    seen.script += [tool_call_reply(("get_weather", {"city": "Oslo"})), "It is sunny in Oslo."]


@pytest.fixture
def model(seen: Seen) -> FakeChatModel:
    return FakeChatModel(model_name="gpt-4o-mini", respond=seen)


@pytest.fixture
def bot(store: HistoryStore, model: FakeChatModel) -> Chatbot:
    settings = Settings(api_key="sk-test", server_requests_per_minute=0)
    return Chatbot(settings, llm=model, store=store, system="Be kind.")


@pytest.fixture
def app(bot: Chatbot) -> Iterator[tuple[TestClient, Users]]:
    users = Users(bot.store)
    with TestClient(create_app(bot, users=users), raise_server_exceptions=False) as client:
        yield client, users


def _sdk(app: tuple[TestClient, Users], name: str) -> openai.OpenAI:
    client, users = app
    token = users.add(name)
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=token, http_client=client, max_retries=0
    )


@pytest.fixture
def ann(app: tuple[TestClient, Users]) -> openai.OpenAI:
    return _sdk(app, "ann")


@pytest.fixture
def bob(app: tuple[TestClient, Users]) -> openai.OpenAI:
    return _sdk(app, "bob")


def _session(response_id: str) -> str:
    parsed = ResponseId.parse(response_id)
    assert parsed is not None, response_id
    return parsed.session_id


def test_a_new_conversation_is_a_new_session_and_continuing_the_newest_continues_it(
    bot: Chatbot, ann: openai.OpenAI, seen: Seen
) -> None:
    first = ann.responses.create(model="gpt-4o-mini", input="My name is Ann.")
    assert first.output_text == "Echo: My name is Ann."
    assert first.status == "completed" and first.usage is not None
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    second = ann.responses.create(
        model="gpt-4o-mini", input="What is my name?", previous_response_id=first.id
    )
    assert _session(second.id) == _session(first.id)
    assert second.previous_response_id == first.id
    # The session's history was sent, after the deployment's system prompt.
    assert seen.calls[-1] == [
        ("system", "Be kind."),
        ("human", "My name is Ann."),
        ("ai", "Echo: My name is Ann."),
        ("human", "What is my name?"),
    ]
    key = f"ann:{_session(first.id)}"
    assert [m.text for m in bot.history(key)] == [
        "My name is Ann.",
        "Echo: My name is Ann.",
        "What is my name?",
        "Echo: What is my name?",
    ]
    assert bot.usage(key).turns == 2


def test_continuing_an_older_response_forks_a_session_with_the_history_up_to_it(
    bot: Chatbot, ann: openai.OpenAI, seen: Seen
) -> None:
    first = ann.responses.create(model="gpt-4o-mini", input="one")
    second = ann.responses.create(model="gpt-4o-mini", input="two", previous_response_id=first.id)
    forked = ann.responses.create(
        model="gpt-4o-mini", input="two again", previous_response_id=first.id
    )
    assert _session(forked.id) != _session(first.id)
    assert seen.calls[-1][1:] == [("human", "one"), ("ai", "Echo: one"), ("human", "two again")]
    old, new = f"ann:{_session(first.id)}", f"ann:{_session(forked.id)}"
    assert [m.text for m in bot.history(old)] == ["one", "Echo: one", "two", "Echo: two"]
    assert [m.text for m in bot.history(new)] == [
        "one",
        "Echo: one",
        "two again",
        "Echo: two again",
    ]
    # Both branches go on, each from its own newest response.
    ann.responses.create(model="gpt-4o-mini", input="three", previous_response_id=second.id)
    assert seen.calls[-1][-2:] == [("ai", "Echo: two"), ("human", "three")]
    ann.responses.create(model="gpt-4o-mini", input="three b", previous_response_id=forked.id)
    assert seen.calls[-1][-2:] == [("ai", "Echo: two again"), ("human", "three b")]
    assert bot.store.count(old) == 6 and bot.store.count(new) == 6


def test_two_continuations_of_one_response_at_once_each_get_the_id_of_their_place(
    bot: Chatbot, ann: openai.OpenAI, model: FakeChatModel
) -> None:
    first = ann.responses.create(model="gpt-4o-mini", input="one")
    model.delay = 0.3  # both requests find `first` the newest before either is stored

    def more(text: str) -> Any:
        return ann.responses.create(model="gpt-4o-mini", input=text, previous_response_id=first.id)

    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(more, ["a", "b"]))
    assert replies[0].id != replies[1].id
    # The later one forked, or (both finding `first` the newest) ran after the earlier one
    # in its session: either way its id names its own place.
    for reply in replies:
        assert ann.responses.retrieve(reply.id).output_text == reply.output_text


def test_continuing_a_response_while_a_turn_runs_on_its_session_forks(
    ann: openai.OpenAI, model: FakeChatModel
) -> None:
    first = ann.responses.create(model="gpt-4o-mini", input="one")
    model.delay = 1.5  # the first continuation is still at the model when the second comes

    def more(text: str, wait: float) -> Any:
        time.sleep(wait)
        return ann.responses.create(model="gpt-4o-mini", input=text, previous_response_id=first.id)

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(more, "a", 0.0)
        forked = pool.submit(more, "b", 0.7).result()
        continued = running.result()
    assert _session(continued.id) == _session(first.id)
    assert _session(forked.id) != _session(first.id)
    assert ann.responses.retrieve(forked.id).output_text == "Echo: b"


def test_retrieve_and_input_items_give_the_stored_response(ann: openai.OpenAI) -> None:
    first = ann.responses.create(model="gpt-4o-mini", input="one")
    second = ann.responses.create(
        model="gpt-4o-mini",
        input=[{"role": "user", "content": "two"}],
        previous_response_id=first.id,
    )
    ann.responses.create(model="gpt-4o-mini", input="three", previous_response_id=second.id)
    got = ann.responses.retrieve(second.id)
    assert (got.id, got.output_text, got.status) == (second.id, "Echo: two", "completed")
    assert got.usage is not None and second.usage is not None
    assert got.usage.total_tokens == second.usage.total_tokens
    items = ann.responses.input_items.list(second.id).data
    assert [(i.type, i.content[0].text) for i in items] == [("message", "two")]  # type: ignore[union-attr]


def test_a_whole_conversation_as_input_is_stored_as_the_new_sessions_history(
    bot: Chatbot, ann: openai.OpenAI, seen: Seen
) -> None:
    conversation: Any = [
        {"role": "user", "content": "I am Ann."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello Ann."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Who am I?"}]},
    ]
    reply = ann.responses.create(model="gpt-4o-mini", input=conversation, instructions="Be brief.")
    assert reply.instructions == "Be brief."  # echoed back, not sent
    assert seen.calls[-1] == [
        ("system", "Be kind."),
        ("human", "I am Ann."),
        ("ai", "Hello Ann."),
        ("human", "Who am I?"),
    ]
    assert bot.store.count(f"ann:{_session(reply.id)}") == 4
    assert ann.responses.retrieve(reply.id).output_text == "Echo: Who am I?"


def test_another_users_response_id_is_not_found_and_changes_nothing(
    bot: Chatbot, ann: openai.OpenAI, bob: openai.OpenAI
) -> None:
    mine = ann.responses.create(model="gpt-4o-mini", input="secret")
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model="gpt-4o-mini", input="tell me", previous_response_id=mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(mine.id)
    assert ann.responses.retrieve(mine.id).output_text == "Echo: secret"
    assert bot.usage(user_id="bob").turns == 0
    for made_up in ("resp_x", "resp_" + "0" * 32 + "_0_0", mine.id.replace("_0_", "_1_")):
        with pytest.raises(openai.NotFoundError):
            ann.responses.retrieve(made_up)


def test_a_model_not_served_is_openais_404_and_nothing_is_sent(
    bot: Chatbot, ann: openai.OpenAI, seen: Seen
) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        ann.responses.create(model="gpt-9-unlisted", input="hi")
    assert refused.value.code == "model_not_found"
    assert not seen.calls and bot.usage(user_id="ann").turns == 0


def test_delete_forgets_the_conversation_and_continuing_it_is_not_found(
    bot: Chatbot, ann: openai.OpenAI
) -> None:
    first = ann.responses.create(model="gpt-4o-mini", input="one")
    forked_from = ann.responses.create(
        model="gpt-4o-mini", input="two", previous_response_id=first.id
    )
    fork = ann.responses.create(model="gpt-4o-mini", input="fork", previous_response_id=first.id)
    ann.responses.delete(forked_from.id)
    for gone in (first.id, forked_from.id):
        with pytest.raises(openai.NotFoundError):
            ann.responses.retrieve(gone)
        with pytest.raises(openai.NotFoundError):
            ann.responses.create(model="gpt-4o-mini", input="more", previous_response_id=gone)
    assert ann.responses.retrieve(fork.id).output_text == "Echo: fork"  # its own session
    assert bot.usage(user_id="ann").turns == 3  # what it spent stays in the ledger


def test_store_false_keeps_nothing_and_is_metered(
    bot: Chatbot, ann: openai.OpenAI, seen: Seen
) -> None:
    first = ann.responses.create(model="gpt-4o-mini", input="one")
    sessions = set(bot.sessions())
    reply = ann.responses.create(
        model="gpt-4o-mini", input="two", store=False, previous_response_id=first.id
    )
    assert reply.output_text == "Echo: two" and reply.store is False
    assert seen.calls[-1] == [
        ("system", "Be kind."),
        ("human", "one"),
        ("ai", "Echo: one"),
        ("human", "two"),
    ]
    assert set(bot.sessions()) == sessions
    assert bot.usage(user_id="ann").turns == 2
    with pytest.raises(openai.NotFoundError):
        ann.responses.retrieve(reply.id)
    with pytest.raises(openai.NotFoundError):
        ann.responses.create(model="gpt-4o-mini", input="three", previous_response_id=reply.id)


def test_a_streamed_response_sends_the_semantic_events_in_order(
    bot: Chatbot, ann: openai.OpenAI
) -> None:
    first = ann.responses.create(model="gpt-4o-mini", input="one")
    with ann.responses.stream(
        model="gpt-4o-mini", input="two words", previous_response_id=first.id
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == "Echo: two words"
    assert final.id == events[0].response.id  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens > 0
    assert _session(final.id) == _session(first.id)
    assert ann.responses.retrieve(final.id).output_text == "Echo: two words"


def test_what_the_endpoint_cannot_do_is_refused_with_400_before_anything_is_sent(
    ann: openai.OpenAI, seen: Seen
) -> None:
    first = ann.responses.create(model="gpt-4o-mini", input="one")
    refused: list[dict[str, Any]] = [
        {"input": "hi", "background": True},
        {"input": "hi", "tools": [{"type": "web_search"}]},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        {"input": [{"role": "assistant", "content": "only an answer"}]},
        {"input": [{"type": "item_reference", "id": "x"}]},
        {  # with previous_response_id, the input is the new turn only
            "previous_response_id": first.id,
            "input": [
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "twice"},
                {"role": "user", "content": "more"},
            ],
        },
    ]
    calls = len(seen.calls)
    for fields in refused:
        with pytest.raises(openai.BadRequestError):
            ann.responses.create(model="gpt-4o-mini", **fields)
    assert len(seen.calls) == calls


def test_errors_have_openais_shape(app: tuple[TestClient, Users]) -> None:
    client, _ = app
    answer = client.get("/v1/responses/resp_unknown")
    assert answer.status_code == 401
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    answer = client.post(
        "/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", "nonsense": 1}
    )
    assert answer.status_code in (400, 401)
    assert json.loads(answer.text)["error"]["type"] == "invalid_request_error"


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def test_the_function_call_loop_stores_the_whole_exchange_in_the_session(
    bot: Chatbot, ann: openai.OpenAI, fake_calls: None
) -> None:
    asked = ann.responses.create(model="gpt-4o-mini", input="Weather in Oslo?", tools=[WEATHER])  # type: ignore[list-item]
    calls = [item for item in asked.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    answered = ann.responses.create(
        model="gpt-4o-mini",
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert answered.output_text == "It is sunny in Oslo."
    assert _session(answered.id) == _session(asked.id)
    key = f"ann:{_session(asked.id)}"
    assert [m.type for m in bot.history(key)] == ["human", "ai", "tool", "ai"]
    # Each response is found again: the call, then the result and the answer.
    again = ann.responses.retrieve(asked.id)
    assert [item.type for item in again.output] == ["function_call"]
    assert ann.responses.retrieve(answered.id).output_text == "It is sunny in Oslo."
    items = ann.responses.input_items.list(answered.id).data
    assert [(i.type, i.output) for i in items] == [("function_call_output", "sunny")]  # type: ignore[union-attr]
    # Continuing from the call again forks before its result.
    fork = ann.responses.create(
        model="gpt-4o-mini",
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "rain"}],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert _session(fork.id) != _session(asked.id)
    assert [m.text for m in bot.history(f"ann:{_session(fork.id)}")][2:] == ["rain", "Echo: rain"]


def test_a_streamed_function_call_sends_its_item_and_arguments(
    ann: openai.OpenAI, fake_calls: None
) -> None:
    with ann.responses.stream(
        model="gpt-4o-mini", input="Weather in Oslo?", tools=[WEATHER]
    ) as stream:  # type: ignore[list-item]
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [(i.type, json.loads(i.arguments)) for i in final.output] == [  # type: ignore[union-attr]
        ("function_call", {"city": "Oslo"})
    ]


def test_the_results_of_parallel_calls_are_one_turn(ann: openai.OpenAI, seen: Seen) -> None:
    seen.script += [
        tool_call_reply(("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Bergen"})),
        "Sunny in Oslo, rain in Bergen.",
    ]
    asked = ann.responses.create(model="gpt-4o-mini", input="Oslo and Bergen?", tools=[WEATHER])  # type: ignore[list-item]
    results: Any = [
        {"type": "function_call_output", "call_id": item.call_id, "output": output}  # type: ignore[union-attr]
        for item, output in zip(asked.output, ["sunny", "rain"], strict=True)
    ]
    answered = ann.responses.create(
        model="gpt-4o-mini",
        previous_response_id=asked.id,
        input=results,
        tools=[WEATHER],  # type: ignore[list-item]
    )
    got = ann.responses.retrieve(answered.id)
    assert got.output_text == "Sunny in Oslo, rain in Bergen."
    items = ann.responses.input_items.list(answered.id, order="asc").data
    assert [i.output for i in items] == ["sunny", "rain"]  # type: ignore[union-attr]


def test_a_failed_turn_leaves_no_session_behind(
    bot: Chatbot, ann: openai.OpenAI, model: FakeChatModel
) -> None:
    first = ann.responses.create(model="gpt-4o-mini", input="one")
    ann.responses.create(model="gpt-4o-mini", input="two", previous_response_id=first.id)
    sessions = set(bot.sessions())
    conversation: Any = [
        {"role": "user", "content": "I am Ann."},
        {"role": "assistant", "content": "Hello Ann."},
        {"role": "user", "content": "Who am I?"},
    ]
    for fields in (
        {"input": conversation},  # a new conversation's history, written first
        {"input": "fork", "previous_response_id": first.id},  # a fork, written first
    ):
        model.errors.append(errors.ServerError("the endpoint broke"))
        model.model_post_init(None)  # the script's errors are read at construction
        with pytest.raises(openai.InternalServerError):
            ann.responses.create(model="gpt-4o-mini", **fields)
    assert set(bot.sessions()) == sessions


def test_x_session_id_is_not_read_here_and_names_the_conversation_on_chat_completions(
    bot: Chatbot, ann: openai.OpenAI, seen: Seen
) -> None:
    first = ann.responses.create(
        model="gpt-4o-mini", input="one", extra_headers={"X-Session-Id": "elsewhere"}
    )
    assert _session(first.id).startswith("resp-") and "ann:elsewhere" not in bot.sessions()
    chat = ann.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "two"}],
        extra_headers={"X-Session-Id": _session(first.id)},
    )
    assert chat.choices[0].message.content == "Echo: two"
    assert seen.calls[-1][1:] == [("human", "one"), ("ai", "Echo: one"), ("human", "two")]
    # The session went on elsewhere: continuing from `first` now forks before that turn.
    later = ann.responses.create(model="gpt-4o-mini", input="three", previous_response_id=first.id)
    assert _session(later.id) != _session(first.id)
    assert seen.calls[-1][1:] == [("human", "one"), ("ai", "Echo: one"), ("human", "three")]


def test_a_stream_cut_mid_reply_raises_api_error_and_keeps_the_partial_reply(
    bot: Chatbot, ann: openai.OpenAI, model: FakeChatModel
) -> None:
    model.fail_after_chunks = 1
    kinds: list[str] = []
    with (
        pytest.raises(openai.APIError) as raised,
        ann.responses.stream(model="gpt-4o-mini", input="two words please") as stream,
    ):
        for event in stream:
            kinds.append(event.type)
    assert "response.output_text.delta" in kinds and "response.completed" not in kinds
    assert raised.value.body["code"] == "EndpointConnectionError"  # type: ignore[index]
    (session,) = [s for s in bot.sessions() if s.startswith("ann:resp-")]
    stored = bot.history(session)
    assert stored[-1].response_metadata.get("interrupted") is True
