"""A streamed reply is held as its text: no chunk outlives its turn in the chain's hands."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import add_ai_message_chunks
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult

from chatchain import Budget, Chatbot, Settings, create_chat_chain, get_openai_callback
from chatchain._streaming import SharedText, StreamedReply, TextBuffer

CHUNKS = 600
WORDS = [f"w{i} " for i in range(CHUNKS)]
USAGE = {"input_tokens": 7, "output_tokens": CHUNKS, "total_tokens": 7 + CHUNKS}


class LazyModel(BaseChatModel):
    """Makes each chunk as it is read (a fake that lists its chunks up front keeps them)."""

    @property
    def _llm_type(self) -> str:
        return "lazy"

    def _chunks(self) -> Iterator[ChatGenerationChunk]:
        for word in WORDS:
            yield ChatGenerationChunk(message=AIMessageChunk(content=word))
        last = AIMessageChunk(
            content="",
            usage_metadata=USAGE,  # type: ignore[arg-type]
            response_metadata={"model_name": "gpt-4o-mini", "finish_reason": "stop"},
        )
        yield ChatGenerationChunk(message=last, generation_info={"finish_reason": "stop"})

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage("".join(WORDS)))])

    def _stream(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Iterator[Any]:
        yield from self._chunks()

    async def _astream(
        self, messages: list[BaseMessage], *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        for chunk in self._chunks():
            yield chunk


class Ends(BaseCallbackHandler):
    def __init__(self) -> None:
        self.ends: list[LLMResult] = []

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.ends.append(response)


def _chain(settings: Settings, budgeted: bool) -> Any:
    budget = Budget(session_tokens=1_000_000) if budgeted else Budget()
    return create_chat_chain(
        LazyModel(), settings=settings.model_copy(update={"max_tokens": 5000}), budget=budget
    )


def _alive(refs: list[weakref.ref[Any]]) -> int:
    gc.collect()
    return sum(ref() is not None for ref in refs)


def _check_turn(chain: Any, session: str, ends: Ends, cb: Any) -> None:
    stored = chain.get_session_history(session).messages[-1]
    assert stored.content == "".join(WORDS)
    assert stored.usage_metadata == USAGE
    assert stored.response_metadata["finish_reason"] == "stop"
    assert "interrupted" not in stored.response_metadata
    [end] = ends.ends  # one generation, folded: the whole text and the usage
    assert end.generations[0][0].message.content == "".join(WORDS)
    assert end.generations[0][0].message.usage_metadata == USAGE
    assert cb.completion_tokens == CHUNKS and cb.prompt_tokens == 7
    assert chain.ledger.total(session).completion_tokens == CHUNKS


@pytest.mark.parametrize("budgeted", [False, True], ids=["plain", "budget"])
def test_a_stream_keeps_no_chunk_while_it_runs(settings: Settings, budgeted: bool) -> None:
    chain, ends = _chain(settings, budgeted), Ends()
    session = f"sync-{budgeted}"
    config = {"configurable": {"session_id": session}, "callbacks": [ends]}
    refs: list[weakref.ref[Any]] = []
    with get_openai_callback() as cb:
        for chunk in chain.stream({"input": "go"}, config):
            if isinstance(chunk, AIMessageChunk):
                refs.append(weakref.ref(chunk))
            if len(refs) == CHUNKS - 10:
                # The stream is still open: the chunks read so far are gone but the latest few.
                assert _alive(refs) <= 3
            del chunk
    _check_turn(chain, session, ends, cb)


@pytest.mark.parametrize("budgeted", [False, True], ids=["plain", "budget"])
def test_an_async_stream_keeps_no_chunk_while_it_runs(settings: Settings, budgeted: bool) -> None:
    chain, ends = _chain(settings, budgeted), Ends()
    session = f"async-{budgeted}"
    config = {"configurable": {"session_id": session}, "callbacks": [ends]}
    refs: list[weakref.ref[Any]] = []

    async def run() -> None:
        async for chunk in chain.astream({"input": "go"}, config):
            if isinstance(chunk, AIMessageChunk):
                refs.append(weakref.ref(chunk))
            if len(refs) == CHUNKS - 10:
                assert _alive(refs) <= 3
            del chunk

    with get_openai_callback() as cb:
        asyncio.run(run())
    _check_turn(chain, session, ends, cb)


def test_invoke_under_a_budget_returns_the_whole_reply(settings: Settings) -> None:
    chain, ends = _chain(settings, budgeted=True), Ends()
    config = {"configurable": {"session_id": "i"}, "callbacks": [ends]}
    with get_openai_callback() as cb:
        reply = chain.invoke({"input": "go"}, config)
    assert reply.content == "".join(WORDS) and reply.usage_metadata == USAGE
    _check_turn(chain, "i", ends, cb)


def _chunks() -> list[AIMessageChunk]:
    calls = [
        {"name": "add", "args": '{"a": ', "id": "call_1", "index": 0},
        {"name": None, "args": "1}", "id": None, "index": 0},
        {"name": "mul", "args": '{"b": 2}', "id": "call_2", "index": 1},
    ]
    return [
        AIMessageChunk(content="", id="lc_run-1", response_metadata={"model_provider": "x"}),
        AIMessageChunk(content="Hel", id="chatcmpl-9", additional_kwargs={"refusal": None}),
        AIMessageChunk(content="lo", id="chatcmpl-9", response_metadata={"model_provider": "x"}),
        *(AIMessageChunk(content="", tool_call_chunks=[call]) for call in calls),  # type: ignore[list-item]
        AIMessageChunk(
            content="",
            usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
            response_metadata={"finish_reason": "tool_calls", "model_name": "m"},
        ),
        AIMessageChunk(content="", chunk_position="last", id="lc_run-1"),
    ]


def test_the_folded_reply_is_what_langchain_merges() -> None:
    reply = StreamedReply()
    for chunk in _chunks():
        reply.add(chunk)
    assert reply.chunk() == add_ai_message_chunks(*_chunks())
    message = reply.message()
    assert [call["name"] for call in message.tool_calls] == ["add", "mul"]
    assert message.tool_calls[0]["args"] == {"a": 1}
    assert message.content == "Hello" and message.id == "chatcmpl-9"


# -- the reply's text, held once --------------------------------------------------------------


@pytest.mark.parametrize("budgeted", [False, True], ids=["plain", "budget"])
def test_a_streamed_text_is_held_once_by_every_fold_of_its_chunks(
    settings: Settings, budgeted: bool
) -> None:
    chain, ends = _chain(settings, budgeted), Ends()
    config = {"configurable": {"session_id": "once"}, "callbacks": [ends]}
    chunks, turn = chain.stream_turn({"input": "go"}, config)
    for _ in chunks:
        pass
    text = turn.streamed_reply().content
    assert text == "".join(WORDS)
    # The model's run (for on_llm_end), the turn and the stored message: one string.
    [end] = ends.ends
    assert end.generations[0][0].message.content is text
    assert end.generations[0][0].text is text
    assert chain.get_session_history("once").messages[-1].content is text


def test_a_chatbot_streams_text_is_the_turns(settings: Settings) -> None:
    bot = Chatbot(settings, llm=LazyModel())
    with bot.stream("go", session_id="bot") as stream:
        pieces = list(stream)
    assert stream.text == "".join(pieces) == "".join(WORDS)
    assert stream.text is bot.history("bot")[-1].content


def test_a_checkpoint_keeps_the_turns_text_not_a_copy(settings: Settings) -> None:
    chain = _chain(settings, budgeted=False)
    turn = chain._spec.begin(
        {"input": "go"}, {"configurable": {"session_id": "ck"}}, chain._get_input_messages
    )
    turn.sending(lambda: 7)
    assert turn._ahead is not None and turn._ahead.kept
    for word in WORDS:
        turn.add_chunk(AIMessageChunk(content=word))
    turn._ahead.due = 0.0
    turn.checkpoint()
    assert turn._ahead.record["reply"] == "".join(WORDS)
    assert turn._ahead.record["reply"] is turn._text_so_far()


def test_a_fold_that_missed_a_piece_keeps_its_own_text() -> None:
    shared = SharedText()
    first, second = TextBuffer(shared), TextBuffer(shared)
    for piece in ["a", "b", "c"]:
        first.write(piece)
        second.write(piece)  # written by the first already: the second moves on
    assert first.getvalue() is second.getvalue() is shared.value()
    first.write("d")
    first.write("e")  # the second never sees "d": behind by two, it copies its own text
    second.write("x")
    assert (first.getvalue(), second.getvalue()) == ("abcde", "abcx")
    late = TextBuffer(shared)  # made mid-text: holds what is written after
    first.write("f")
    late.write("f")
    assert (late.getvalue(), first.getvalue()) == ("f", "abcdef")
