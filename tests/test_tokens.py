"""Token counts never below what an endpoint bills, for every script, offline.

The exact counters are checked against `OpenAITestServer`, which bills with a real tokenizer
over HTTP (so what is compared is what the endpoint reports, chat format included); the
UTF-8 bytes bound against every real tokenizer toktok ships (OpenAI's and Qwen's).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import toktok  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.utils import convert_to_openai_messages

from chatchain._tokens import (
    APPROXIMATE,
    EXACT,
    UTF8_BYTES,
    _count_texts,
    choose_counter,
    encoding_of,
)
from chatchain.testing import FakeChatModel, OpenAITestServer

# Text of every script: CJK, kana, Hangul, emoji, Cyrillic, Arabic, Devanagari, Thai,
# combining marks, code, Latin, and anything else Unicode has (no lone surrogates: no
# endpoint can receive them).
_RANGES = [
    (0x4E00, 0x9FFF),
    (0x3040, 0x30FF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1FAFF),
    (0x0400, 0x04FF),
    (0x0600, 0x06FF),
    (0x0900, 0x097F),
    (0x0E00, 0x0E7F),
    (0x0300, 0x036F),
]
_ANY = st.characters(exclude_categories=["Cs"])
_SCRIPT = st.one_of(
    *(st.characters(min_codepoint=lo, max_codepoint=hi) for lo, hi in _RANGES),
    st.sampled_from(list("{}[]();=<>+-*/\"'`\\_.,:#!?\t\n ")),  # code
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),  # Latin
    _ANY,
)
TEXT = st.text(_SCRIPT, max_size=120) | st.text(_ANY, max_size=60)


def _messages(texts: list[str]) -> list[BaseMessage]:
    """A system message and a conversation of ``texts``, ending with the user's."""
    turns: list[BaseMessage] = [SystemMessage(texts[0])]
    for i, text in enumerate(texts[1:]):
        turns.append(AIMessage(text) if i % 2 else HumanMessage(text))
    if turns[-1].type != "human":
        turns.append(HumanMessage("?"))
    return turns


@pytest.fixture(scope="module", params=["o200k_base", "cl100k_base"])
def billing(request: pytest.FixtureRequest) -> Iterator[tuple[str, openai.OpenAI]]:
    encoding: str = request.param
    with (
        OpenAITestServer(encoding=encoding) as server,
        openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as client,
    ):
        yield encoding, client


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(texts=st.lists(TEXT, min_size=1, max_size=6))
def test_the_exact_count_is_never_below_the_billed_prompt(
    billing: tuple[str, openai.OpenAI], texts: list[str]
) -> None:
    encoding, client = billing
    messages = _messages(texts)
    wire: Any = convert_to_openai_messages(messages)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=wire, max_tokens=1)
    assert reply.usage is not None
    assert EXACT[encoding](messages) >= reply.usage.prompt_tokens
    # The bound that is used when the tokenizer is unknown is never below it either.
    assert UTF8_BYTES(messages) >= reply.usage.prompt_tokens


@pytest.mark.slow  # 300 examples x 4 tokenizers; the test above checks the bound too (60)
@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_the_bytes_bound_is_never_below_any_real_tokenizer(text: str) -> None:
    # The bound's own per-message allowance covers a chat template's special tokens; the
    # text alone must never count fewer bytes than any tokenizer has tokens.
    size = len(text.encode())
    for encoding in ("o200k_base", "cl100k_base", "o200k_harmony", "qwen3.5"):
        assert toktok.batch_count([text], encoding, threads=1)[0] <= size


def test_cjk_text_is_counted_as_billed_where_the_approximation_counts_a_quarter() -> None:
    messages = [HumanMessage("请用几句话解释为什么天空是蓝色的而日落是红色的。" * 20)]
    with (
        OpenAITestServer() as server,
        openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as client,
    ):
        wire: Any = convert_to_openai_messages(messages)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=wire)
    assert reply.usage is not None
    billed = reply.usage.prompt_tokens
    assert EXACT["o200k_base"](messages) == billed
    assert APPROXIMATE(messages) < billed / 2  # what held CJK turns before: 3.5x over a cap


def test_tool_calls_and_schemas_count_at_least_what_the_server_bills() -> None:
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    call = {"name": "get_weather", "args": {"city": "北京"}, "id": "call_1"}
    messages: list[BaseMessage] = [
        HumanMessage("北京天气?"),
        AIMessage("", tool_calls=[call]),  # type: ignore[list-item]
    ]
    from langchain_core.messages import ToolMessage
    from langchain_core.utils.function_calling import convert_to_openai_tool

    messages.append(ToolMessage("晴天 ☀️", tool_call_id="call_1"))
    counter = EXACT["o200k_base"]
    with (
        OpenAITestServer() as server,
        openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as client,
    ):
        wire: Any = convert_to_openai_messages(messages)
        tools: Any = [convert_to_openai_tool(get_weather)]
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=wire, tools=tools)
    assert reply.usage is not None
    assert counter(messages) + counter.count_tools([get_weather]) >= reply.usage.prompt_tokens


@pytest.mark.parametrize(
    ("model", "counter"),
    [
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("openrouter/gpt-4o-mini", "o200k_base"),  # a proxy's name for OpenAI's model
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("llama3.1:8b", "utf8-bytes"),  # local servers: the tokenizer is not OpenAI's
        ("qwen2.5:7b", "utf8-bytes"),
        ("gpt-oss-20b", "utf8-bytes"),  # harmony's template adds its own preamble
    ],
)
def test_the_counter_follows_the_models_tokenizer(model: str, counter: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, api_key="k")  # type: ignore[arg-type]
    assert choose_counter(llm).name == counter
    assert choose_counter(llm.bind(max_tokens=5)).name == counter
    assert (encoding_of(model) is None) == (counter == "utf8-bytes")


def test_the_fake_model_is_counted_as_it_bills() -> None:
    assert choose_counter(FakeChatModel()).name == "approximate"
    assert choose_counter(FakeChatModel(), "utf8-bytes").name == "utf8-bytes"


def test_a_lone_surrogate_is_counted_not_refused() -> None:
    assert EXACT["o200k_base"]([AIMessage("smile \ud83d")]) > 0


def test_counting_a_long_history_takes_milliseconds() -> None:
    history = [
        HumanMessage(f"Question {i}: how does the window count tokens? " * 3)
        if i % 2 == 0
        else AIMessage(f"Answer {i}: exactly, with the model's own encoding. " * 5)
        for i in range(100)
    ]
    counter = EXACT["o200k_base"]
    counter(history)  # the encoding loads once
    started = time.perf_counter()
    for _ in range(10):
        counter(history)
    assert (time.perf_counter() - started) / 10 < 0.05


@settings(max_examples=40, deadline=None)
@given(
    texts=st.lists(TEXT | st.sampled_from(["<|endoftext|>", "<|im_start|>user", ""]), max_size=80)
)
def test_a_few_texts_one_by_one_count_as_a_batch(texts: list[str]) -> None:
    # A prompt's few texts are counted one by one (`toktok.truncate`), many in one batch.
    for encoding in ("o200k_base", "cl100k_base"):
        assert _count_texts(texts, encoding) == sum(toktok.batch_count(texts, encoding, threads=1))
