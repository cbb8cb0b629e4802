"""The chain factory: prompt, model and history in one runnable, prompt variables, metering."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from langchain_core.chat_history import InMemoryChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_openai import ChatOpenAI

from chatchain import (
    Budget,
    BudgetExceeded,
    ConfigurationError,
    MemoryStore,
    MissingPromptVariableError,
    Settings,
    create_chat_chain,
    get_message_history,
    get_openai_callback,
)
from chatchain.testing import FakeChatModel


def cfg(session_id: str) -> dict[str, Any]:
    return {"configurable": {"session_id": session_id}}


@pytest.fixture
def chain(settings: Settings, fake: FakeChatModel):  # type: ignore[no-untyped-def]
    return create_chat_chain(
        fake,
        settings=settings,
        system="Answer in {language}.",
        get_session_history=MemoryStore(),
    )


def test_chain_has_the_designs_shape(chain, fake: FakeChatModel) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(chain, RunnableWithMessageHistory)
    assert [type(m).__name__ for m in chain.prompt.messages] == [
        "SystemMessagePromptTemplate",
        "MessagesPlaceholder",
        "HumanMessagePromptTemplate",
    ]
    assert chain.model is fake
    assert chain.input_messages_key == "input"
    assert chain.history_messages_key == "history"


def test_multi_turn_memory_sends_the_history(chain, fake: FakeChatModel) -> None:  # type: ignore[no-untyped-def]
    chain.invoke({"input": "Hi, I'm Bob", "language": "English"}, config=cfg("dp123"))
    chain.invoke({"input": "What's my name?", "language": "English"}, config=cfg("dp123"))
    sent = fake.calls[-1]
    assert [type(m) for m in sent] == [SystemMessage, HumanMessage, AIMessage, HumanMessage]
    assert sent[0].content == "Answer in English."
    assert sent[1].content == "Hi, I'm Bob"
    assert sent[2].content == "Echo: Hi, I'm Bob"
    assert sent[3].content == "What's my name?"


def test_the_history_is_read_in_the_callers_thread(settings: Settings) -> None:
    # LangChain's `RunnablePassthrough.assign` would read it in a new thread on every call.
    readers: list[threading.Thread] = []

    class Store(MemoryStore):
        def load(
            self, session_id: str, start: int = 0, stop: int | None = None
        ) -> list[BaseMessage]:
            readers.append(threading.current_thread())
            return super().load(session_id, start, stop)

    store = Store()
    # No deadline: a fake model's calls would run in the deadline's worker thread.
    unbounded = settings.model_copy(update={"turn_deadline": None})
    chain = create_chat_chain(FakeChatModel(), settings=unbounded, get_session_history=store)
    for text in ("Hi, I'm Bob", "What's my name?"):
        chain.invoke({"input": text}, config=cfg("t"))
        list(chain.stream({"input": text}, config=cfg("t")))
    assert len(readers) >= 4 and set(readers) == {threading.current_thread()}
    assert len(store.load("t")) == 8


def test_sessions_are_isolated(chain, fake: FakeChatModel) -> None:  # type: ignore[no-untyped-def]
    chain.invoke({"input": "secret of A", "language": "English"}, config=cfg("A"))
    chain.invoke({"input": "hello from B", "language": "English"}, config=cfg("B"))
    assert [m.content for m in fake.calls[-1]] == ["Answer in English.", "hello from B"]


def test_prompt_variables_per_call_override_chain_defaults(settings: Settings) -> None:
    fake = FakeChatModel()
    chain = create_chat_chain(
        fake,
        settings=settings,
        system="You are a {role}; answer in {language}.",
        prompt_vars={"role": "pirate", "language": "English"},
        get_session_history=MemoryStore(),
    )
    chain.invoke({"input": "hi"}, config=cfg("s"))
    assert fake.calls[-1][0].content == "You are a pirate; answer in English."
    chain.invoke({"input": "hi", "language": "French"}, config=cfg("s"))
    assert fake.calls[-1][0].content == "You are a pirate; answer in French."


def test_missing_prompt_variable_is_refused_before_sending(chain, fake: FakeChatModel) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MissingPromptVariableError, match=r"\{language\}.*language=\.\.\."):
        chain.invoke({"input": "hi"}, config=cfg("s"))
    assert fake.calls == []


def test_default_store_is_a_dict_of_chat_message_history(settings: Settings) -> None:
    chain = create_chat_chain(FakeChatModel(), settings=settings, system="Be brief.")
    chain.invoke({"input": "remember me"}, config=cfg("default-store-test"))
    history = get_message_history("default-store-test")
    assert isinstance(history, InMemoryChatMessageHistory)
    assert [m.content for m in history.messages] == ["remember me", "Echo: remember me"]


def test_message_list_input_form(settings: Settings) -> None:
    # The message-list form: one placeholder `my_msg` that the history is prepended to.
    fake = FakeChatModel()
    store = MemoryStore()
    chain = create_chat_chain(
        fake,
        settings=settings,
        system="Be brief.",
        input_key="my_msg",
        history_key=None,
        get_session_history=store,
    )
    chain.invoke({"my_msg": [HumanMessage("one")]}, config=cfg("m"))
    chain.invoke({"my_msg": [HumanMessage("two")]}, config=cfg("m"))
    assert [m.content for m in fake.calls[-1]] == ["Be brief.", "one", "Echo: one", "two"]
    assert [m.content for m in store("m").messages] == ["one", "Echo: one", "two", "Echo: two"]


async def test_invoke_stream_ainvoke_astream_agree(settings: Settings) -> None:
    """The same turns through each entry point give the same history and usage."""
    results = {}
    for mode in ("invoke", "stream", "ainvoke", "astream"):
        store = MemoryStore()
        chain = create_chat_chain(
            FakeChatModel(model_name="gpt-4o-mini"),
            settings=settings,
            system="Hi.",
            get_session_history=store,
        )
        for text in ("first question", "second question"):
            value = {"input": text}
            if mode == "invoke":
                chain.invoke(value, config=cfg("p"))
            elif mode == "stream":
                "".join(c.content for c in chain.stream(value, config=cfg("p")))
            elif mode == "ainvoke":
                await chain.ainvoke(value, config=cfg("p"))
            else:
                [c async for c in chain.astream(value, config=cfg("p"))]
        usage = chain.ledger.total("p")
        results[mode] = (
            [(m.type, m.content) for m in store("p").messages],
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
                usage.successful_requests,
                usage.turns,
                round(usage.cost_usd or -1, 12),
            ),
        )
    assert results["invoke"][1][0] > 0
    assert results["invoke"] == results["stream"] == results["ainvoke"] == results["astream"]


def test_users_own_get_openai_callback_sees_every_token(chain) -> None:  # type: ignore[no-untyped-def]
    with get_openai_callback() as cb:
        chain.invoke({"input": "count me", "language": "English"}, config=cfg("cb"))
        list(chain.stream({"input": "and me", "language": "English"}, config=cfg("cb")))
    usage = chain.ledger.total("cb")
    assert cb.total_tokens == usage.total_tokens > 0
    assert cb.successful_requests == 2


async def test_gathered_turns_are_metered_separately_and_add_up(chain) -> None:  # type: ignore[no-untyped-def]
    texts = [f"question number {i} " + "word " * i for i in range(8)]
    await asyncio.gather(
        *(
            chain.ainvoke({"input": t, "language": "English"}, config=cfg(f"g{i}"))
            for i, t in enumerate(texts)
        )
    )
    per_session = [chain.ledger.total(f"g{i}") for i in range(8)]
    assert all(u.turns == 1 and u.successful_requests == 1 for u in per_session)
    # Longer questions cost more prompt tokens: each turn was counted on its own.
    assert [u.prompt_tokens for u in per_session] == sorted(u.prompt_tokens for u in per_session)
    assert len({u.prompt_tokens for u in per_session}) == 8
    assert chain.ledger.total().total_tokens == sum(u.total_tokens for u in per_session)


def test_batch_and_abatch_run_through_turns(chain) -> None:  # type: ignore[no-untyped-def]
    inputs = [{"input": f"b{i}", "language": "English"} for i in range(3)]
    replies = chain.batch(inputs, config=cfg("batch"))
    assert [r.content for r in replies] == ["Echo: b0", "Echo: b1", "Echo: b2"]
    assert chain.ledger.total("batch").turns == 3
    replies = asyncio.run(chain.abatch(inputs, config=cfg("abatch")))
    assert len(replies) == 3
    assert len(chain.get_session_history("abatch").messages) == 6


def test_composed_chain_still_saves_history(chain) -> None:  # type: ignore[no-untyped-def]
    from langchain_core.output_parsers import StrOutputParser

    composed = chain | StrOutputParser()
    pieces = list(composed.stream({"input": "pipe me", "language": "English"}, config=cfg("c")))
    assert "".join(pieces) == "Echo: pipe me"
    assert [m.content for m in chain.get_session_history("c").messages] == [
        "pipe me",
        "Echo: pipe me",
    ]


def test_cost_is_none_for_a_model_of_unknown_price(settings: Settings) -> None:
    chain = create_chat_chain(
        FakeChatModel(model_name="acme-unreleased-9"),
        settings=settings,
        system="Hi.",
        get_session_history=MemoryStore(),
    )
    chain.invoke({"input": "hi"}, config=cfg("u"))
    usage = chain.ledger.total("u")
    assert usage.total_tokens > 0
    assert usage.cost_usd is None


def test_cost_of_a_known_model_follows_its_price(chain) -> None:  # type: ignore[no-untyped-def]
    chain.invoke({"input": "price me", "language": "English"}, config=cfg("k"))
    usage = chain.ledger.total("k")
    # gpt-4o-mini list price: $0.15 per million prompt tokens, $0.60 per million completion.
    expected = usage.prompt_tokens * 0.15e-6 + usage.completion_tokens * 0.60e-6
    assert usage.cost_usd == pytest.approx(expected)


def test_a_prompt_and_model_chain_is_refused_as_llm(settings: Settings) -> None:
    # A plain `prompt | model` chain passed whole: its prompt would get chatchain's prompt value.
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{input}")])
    for llm in (prompt | FakeChatModel(), (prompt | FakeChatModel()).with_fallbacks([prompt])):
        with pytest.raises(ConfigurationError, match=r"ChatOpenAI\(\.\.\.\).*system='\.\.\.'"):
            create_chat_chain(llm, settings=settings)
    with pytest.raises(ConfigurationError, match="chat model itself"):
        create_chat_chain(prompt, settings=settings)


def test_a_chat_model_with_fallbacks_or_bound_arguments_is_accepted(settings: Settings) -> None:
    failing = FakeChatModel(errors=[RuntimeError("down")])
    models = [
        failing.with_fallbacks([FakeChatModel(replies=["from the fallback"])]),
        FakeChatModel(replies=["from the fallback"]).bind(stop=["never"]),
    ]
    for model in models:
        chain = create_chat_chain(model, settings=settings, get_session_history=MemoryStore())
        assert chain.model is model  # nothing to change in them
        assert chain.invoke({"input": "hi"}, config=cfg("s")).content == "from the fallback"


def test_a_users_chat_openai_is_used_through_a_copy(settings: Settings) -> None:
    llm = ChatOpenAI(model="gpt-4o-mini", api_key="sk-test", base_url="http://127.0.0.1:9/v1")  # type: ignore[arg-type]
    chain = create_chat_chain(llm.bind(temperature=0.5), settings=settings)
    model = chain.model.bound  # type: ignore[attr-defined]
    assert model is not llm and model.stream_usage is True and llm.stream_usage is None
    assert model.root_async_client is not llm.root_async_client
    off = llm.model_copy(update={"stream_usage": False})  # the user's explicit choice stands
    assert create_chat_chain(off, settings=settings).model.stream_usage is False  # type: ignore[attr-defined]


def test_without_memory_sends_the_messages_as_they_are_and_stores_nothing(
    settings: Settings, fake: FakeChatModel
) -> None:
    store = MemoryStore()
    chain = create_chat_chain(
        fake, settings=settings, system="Answer in {language}.", get_session_history=store
    )
    bare = chain.without_memory()
    messages = [SystemMessage("Talk like a pirate."), HumanMessage("hi"), AIMessage("ahoy")]
    messages.append(HumanMessage("again"))

    reply = bare.invoke({"messages": messages}, config=cfg("c1"))
    chunks = list(bare.stream({"messages": messages}, config=cfg("c2")))

    assert reply.content == "Echo: again" and "".join(c.content for c in chunks) == "Echo: again"
    for sent in fake.calls:  # no system prompt of the chain's, no history
        assert [(m.type, m.content) for m in sent] == [(m.type, m.content) for m in messages]
    assert store.sessions() == []
    assert chain.ledger.total("c1").turns == chain.ledger.total("c2").turns == 1


def test_without_memory_turns_are_held_against_the_chains_budget(
    settings: Settings, fake: FakeChatModel
) -> None:
    chain = create_chat_chain(fake, settings=settings, budget=Budget(user_tokens=5))
    bare = chain.without_memory()
    config = {"configurable": {"session_id": "c1", "user_id": "ann"}}

    with pytest.raises(BudgetExceeded):
        bare.invoke({"messages": [HumanMessage("a long enough question")]}, config=config)

    assert fake.calls == []
