"""Structured replies: ``schema=`` gives a validated instance, stored as its JSON text."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from pydantic import BaseModel, Field

from chatchain import (
    Chatbot,
    EndpointError,
    InvalidInputError,
    Settings,
    StructuredReplyError,
    create_chat_chain,
)
from chatchain._structured import refuses_json_schema
from chatchain._tokens import APPROXIMATE
from chatchain.stores import MemoryStore
from chatchain.testing import FakeChatModel, tool_call_reply


class City(BaseModel):
    name: str
    population: int = Field(ge=0)


OSLO = '{"name": "Oslo", "population": 709000}'


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_chat_with_a_schema_returns_the_instance_and_stores_its_json(
    settings: Settings, mode: str
) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", replies=[OSLO])
    bot = Chatbot(settings, llm=fake)
    if mode == "sync":
        reply = bot.chat("Capital of Norway?", session_id="s", schema=City)
    else:
        reply = asyncio.run(bot.achat("Capital of Norway?", session_id="s", schema=City))
    assert reply.parsed == City(name="Oslo", population=709000)
    assert reply.text == '{"name":"Oslo","population":709000}'
    history = bot.history("s")
    assert [(m.type, m.text) for m in history] == [
        ("human", "Capital of Norway?"),
        ("ai", '{"name":"Oslo","population":709000}'),
    ]
    assert not getattr(history[-1], "tool_calls", [])
    # Metered like any turn, in the reply and in the ledger.
    assert reply.usage.turns == 1 and reply.usage.total_tokens > 0
    assert bot.usage("s").total_tokens == reply.usage.total_tokens
    # The next (plain) turn sees the JSON in its history.
    bot.chat("And Sweden?", session_id="s")
    assert json.loads(fake.calls[-1][-2].text) == {"name": "Oslo", "population": 709000}
    assert bot.chat("plain", session_id="s").parsed is None


def test_a_function_call_reply_validates_too(settings: Settings) -> None:
    # BaseChatModel's with_structured_output binds the schema as a tool and forces it.
    fake = FakeChatModel(replies=[tool_call_reply(("City", {"name": "Bergen", "population": 1}))])
    bot = Chatbot(settings, llm=fake)
    reply = bot.chat("A city?", session_id="s", schema=City)
    assert reply.parsed == City(name="Bergen", population=1)
    assert [t["function"]["name"] for t in fake.tools_of_calls[-1]] == ["City"]
    assert bot.history("s")[-1].text == '{"name":"Bergen","population":1}'


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ("not json at all", "does not fit the City schema"),
        ('{"name": "Oslo"}', "population: Field required"),
        ('{"name": "Oslo", "population": -1}', "population: Input should be greater"),
    ],
)
def test_a_reply_that_does_not_validate_raises_stores_nothing_and_is_metered(
    settings: Settings, mode: str, answer: str, says: str
) -> None:
    fake = FakeChatModel()
    bot = Chatbot(settings, llm=fake)
    bot.chat("before", session_id="s")
    fake.queue(answer)
    before = bot.history("s")
    spent = bot.usage("s")
    with pytest.raises(StructuredReplyError) as caught:
        if mode == "sync":
            bot.chat("Capital?", session_id="s", schema=City)
        else:
            asyncio.run(bot.achat("Capital?", session_id="s", schema=City))
    error = caught.value
    assert says in str(error)
    assert "Nothing was stored" in str(error)
    assert isinstance(error, EndpointError)
    assert error.schema is City and error.text == answer
    assert bot.history("s") == before
    after = bot.usage("s")
    assert after.turns == spent.turns + 1  # the endpoint billed it
    assert after.total_tokens > spent.total_tokens


def test_a_cut_reply_says_to_raise_max_tokens(settings: Settings) -> None:
    fake = FakeChatModel(replies=['{"name": "Oslo", "population": 709000}'], max_tokens=3)
    bot = Chatbot(settings, llm=fake)
    with pytest.raises(StructuredReplyError, match="cut short by max_tokens"):
        bot.chat("Capital?", session_id="s", schema=City)


def test_a_schema_must_be_a_pydantic_model(settings: Settings) -> None:
    bot = Chatbot(settings, llm=FakeChatModel())
    with pytest.raises(InvalidInputError, match="pydantic model class"):
        bot.chat("hi", session_id="s", schema=dict)  # type: ignore[arg-type]
    assert bot.history("s") == []


def test_the_chain_form(settings: Settings) -> None:
    fake = FakeChatModel(replies=[OSLO, OSLO])
    store = MemoryStore()
    chain = create_chat_chain(fake, settings=settings, get_session_history=store)
    structured = chain.with_structured_output(City)
    config = {"configurable": {"session_id": "c"}}
    assert structured.invoke({"input": "Capital?"}, config=config) == City(
        name="Oslo", population=709000
    )
    assert asyncio.run(structured.ainvoke({"input": "Again?"}, config=config)) == City(
        name="Oslo", population=709000
    )
    assert [m.type for m in store.load("c")] == ["human", "ai", "human", "ai"]
    assert chain.ledger.total("c").turns == 2
    # The chain itself still answers in text.
    assert chain.invoke({"input": "plain"}, config=config).content == "Echo: plain"


def test_the_json_schema_refusal_is_detected_specifically() -> None:
    import httpx

    request = httpx.Request("POST", "http://x/v1/chat/completions")

    def bad_request(status: int, message: str, param: str | None) -> openai.APIStatusError:
        response = httpx.Response(status, request=request)
        body = {"message": message, "type": "invalid_request_error", "param": param}
        cls = openai.BadRequestError if status == 400 else openai.UnprocessableEntityError
        return cls(message, response=response, body=body)

    refusal = bad_request(
        400,
        "Invalid parameter: 'response_format' of type 'json_schema' is not supported with "
        "this model.",
        "response_format",
    )
    assert refuses_json_schema(refusal)
    assert refuses_json_schema(bad_request(422, "json_schema: unknown variant", None))
    wrapped = ValueError("wrapped")  # as langchain-openai re-raises it, chained
    wrapped.__cause__ = refusal
    assert refuses_json_schema(wrapped)
    assert not refuses_json_schema(
        bad_request(400, "This model's maximum context length is 10 tokens.", "messages")
    )
    assert not refuses_json_schema(bad_request(400, "Bad request.", None))
    assert not refuses_json_schema(RuntimeError("response_format"))


def test_a_structured_turn_is_sent_with_the_budget_holds_reply_limit(settings: Settings) -> None:
    from chatchain.budgets import Budget

    # The prompt takes 18 tokens and the schema sent with it 58: a cap of 80 leaves a few
    # reply tokens, and the structured call is sent with max_tokens cut to them, so the JSON
    # comes back cut short, and the turn cannot spend more than the cap.
    assert APPROXIMATE.count_tools([City]) == 58
    fake = FakeChatModel(model_name="gpt-4o-mini", replies=[OSLO])
    bot = Chatbot(settings, llm=fake, budget=Budget(session_tokens=80))
    with pytest.raises(StructuredReplyError, match="cut short by max_tokens"):
        bot.chat("Capital?", session_id="s", schema=City)
    assert bot.history("s") == []
    assert 76 < bot.usage("s").total_tokens <= 80


def test_a_streamed_structured_turn_sends_the_validated_json_as_one_piece(
    settings: Settings,
) -> None:
    from chatchain._structured import with_schema

    fake = FakeChatModel(replies=[OSLO, OSLO])
    store = MemoryStore()
    chain = create_chat_chain(fake, settings=settings, get_session_history=store)
    config = with_schema({"configurable": {"session_id": "c"}}, City)
    pieces = [chunk.content for chunk in chain.stream({"input": "Capital?"}, config=config)]
    assert pieces == ['{"name":"Oslo","population":709000}']

    async def collect() -> list[object]:
        return [c.content async for c in chain.astream({"input": "Again?"}, config=config)]

    assert asyncio.run(collect()) == ['{"name":"Oslo","population":709000}']
    assert [m.text for m in store.load("c")][1::2] == ['{"name":"Oslo","population":709000}'] * 2
    assert chain.ledger.total("c").turns == 2
