"""The chat model's async streams hand each chunk over as the endpoint's JSON (a dict), and
langchain-openai makes of it exactly what it makes of the OpenAI client's typed chunk."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI

from chatchain.model import create_chat_model
from chatchain.settings import Settings
from chatchain.testing import Fault, OpenAITestServer

MODEL = "gpt-4o-mini"
TEXT = "one two three four"


def chatchain_model(server: OpenAITestServer) -> Any:
    settings = Settings(api_key="sk-test", base_url=server.base_url, model=MODEL, max_retries=0)
    return create_chat_model(settings)


def plain_model(server: OpenAITestServer) -> ChatOpenAI:
    """langchain-openai as it comes: the OpenAI client's typed chunks."""
    return ChatOpenAI(
        model=MODEL, api_key="sk-test", base_url=server.base_url, max_retries=0, stream_usage=True
    )  # type: ignore[call-arg]


async def streamed(model: Any) -> tuple[list[str], AIMessageChunk | None, BaseException | None]:
    """The pieces, the merged message and the error of one streamed call."""
    pieces: list[str] = []
    merged: AIMessageChunk | None = None
    try:
        async for chunk in model.astream(TEXT):
            pieces.append(chunk.text)
            merged = chunk if merged is None else merged + chunk
    except Exception as exc:
        return pieces, merged, exc
    return pieces, merged, None


def test_a_streamed_chunk_comes_from_the_client_as_its_json() -> None:
    with OpenAITestServer() as server:

        async def chunks() -> list[Any]:
            client = chatchain_model(server).async_client
            stream = await client.create(
                model=MODEL, messages=[{"role": "user", "content": TEXT}], stream=True
            )
            async with stream:
                return [chunk async for chunk in stream]

        found = asyncio.run(chunks())

    assert all(type(chunk) is dict for chunk in found)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in found if c["choices"])
    assert text == f"Echo: {TEXT}"


@pytest.mark.parametrize(
    "fault",
    [None, Fault(cut_after=2), Fault(malformed=True), Fault(status=500)],
    ids=["whole", "cut", "malformed", "refused"],
)
def test_a_stream_reads_as_langchain_openai_reads_it_alone(fault: Fault | None) -> None:
    """Text, usage, metadata and errors are those of langchain-openai over typed chunks."""
    with OpenAITestServer() as server:
        found = []
        for make in (plain_model, chatchain_model):
            if fault is not None:
                server.add_fault(fault)
            found.append(asyncio.run(streamed(make(server))))

    (plain_pieces, plain, plain_error), (pieces, merged, error) = found
    assert pieces == plain_pieces
    if plain is None:
        assert merged is None
    else:
        assert merged is not None
        assert merged.content == plain.content
        assert merged.usage_metadata == plain.usage_metadata
        assert merged.response_metadata == plain.response_metadata
    assert type(error) is type(plain_error)
    if fault is None:
        assert plain is not None and plain.usage_metadata is not None
        assert "".join(pieces) == f"Echo: {TEXT}"
    else:
        assert isinstance(error, openai.APIError | ValueError), error
