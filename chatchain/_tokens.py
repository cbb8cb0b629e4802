"""Token counting, offline, that never counts a prompt below what the endpoint can bill.

A budget holds a prompt's tokens before it is sent, so the count must never be low, for any
script (a CJK character is about one token, while a 4-characters-a-token estimate counts a
quarter of that). Three counters, chosen by `choose_counter` from the model's name and
``CHATCHAIN_TOKEN_COUNTER``:

- ``o200k_base`` / ``cl100k_base``: OpenAI's models, counted exactly with their own encoding
  by toktok (whose wheels carry the encodings: nothing is downloaded), plus the chat format's
  tokens that OpenAI bills: 3 a message (and its role), 1 more for a name, 3 a request.
- ``utf8-bytes``: a model whose tokenizer is unknown (a local server's Llama, Qwen, Mistral
  ...). Every byte-level BPE token stands for at least one byte of text, and SentencePiece
  pieces for at least one character (or one byte, with byte fallback), so a text's UTF-8
  bytes are never fewer than its tokens; chat templates add their own tokens, allowed for
  generously per message and per request. About 4x an English count, never low.
- ``approximate``: LangChain's `count_tokens_approximately`, only when asked for; it counts
  CJK text at a quarter of what endpoints bill, so holds can be passed.

Whatever a hold counted, the ledger records what the endpoint reported (the hold is replaced
by the billed entry); a count made here is recorded only when the endpoint reported nothing,
and then marked as an estimate.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import toktok  # type: ignore[import-untyped]  # ships no type hints
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, ToolMessage
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.utils.function_calling import convert_to_openai_tool

from chatchain.errors import ConfigurationError

__all__ = ["TokenCounter", "choose_counter"]

logger = logging.getLogger("chatchain")

CounterSetting = Literal["auto", "exact", "utf8-bytes", "approximate", "tiktoken"]

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}

# OpenAI's chat format: each message is wrapped in 3 tokens (with its role counted as text),
# a name costs 1 more, and every reply is primed with 3 (OpenAI's cookbook, "How to count
# tokens with tiktoken").
_OPENAI_PER_MESSAGE, _OPENAI_PER_NAME, _OPENAI_PER_REQUEST = 3, 1, 3

# Chat templates of open models wrap a message in up to ~6 special tokens (Llama 3's header
# and end-of-turn ids, Qwen's <|im_start|>/<|im_end|>), and some add a default system text;
# the allowance is above both, and small beside the bytes bound's own margin on real text.
_BYTES_PER_MESSAGE, _BYTES_PER_REQUEST = 8, 32


@dataclass(frozen=True)
class TokenCounter:
    """Counts the tokens of messages as the endpoint would bill them, or more.

    Attributes:
        name: ``"o200k_base"`` or ``"cl100k_base"`` when exact for OpenAI's models,
            ``"utf8-bytes"`` for a bound that no tokenizer exceeds, ``"approximate"``.
        count: The counting function.
    """

    name: str
    count: Callable[[Sequence[BaseMessage]], int]

    @property
    def exact(self) -> bool:
        return self.name in _ENCODINGS

    def __call__(self, messages: Sequence[BaseMessage]) -> int:
        return self.count(messages)

    def count_tools(self, tools: Sequence[Any]) -> int:
        """The tokens that binding ``tools`` adds to every prompt: their JSON schemas.

        ``tools`` are anything ``bind_tools`` takes (LangChain tools, typed functions,
        pydantic models, OpenAI tool dicts); each is converted as ``bind_tools`` sends it
        (`convert_to_openai_tool`) and the JSON text is counted like message text. Add it to
        a prompt's count (the budget hold, the window's room) whenever the tools are bound.

        Example:
            >>> def get_weather(city: str) -> str:
            ...     "The weather in a city."
            ...     return "sunny"
            >>> APPROXIMATE.count_tools([get_weather]) > 0, APPROXIMATE.count_tools([])
            (True, 0)
        """
        if not tools:
            return 0
        schemas = json.dumps([convert_to_openai_tool(tool) for tool in tools])
        empty = self.count([SystemMessage("")])
        return max(0, self.count([SystemMessage(schemas)]) - empty)


def _texts(message: BaseMessage) -> list[str]:
    """The texts of ``message`` that the endpoint reads: role, content, name, tool calls."""
    content = message.content
    texts = [
        _ROLES.get(message.type, message.type),
        content if isinstance(content, str) else json.dumps(content, ensure_ascii=False),
    ]
    if message.name:
        texts.append(message.name)
    if isinstance(message, ToolMessage):
        texts.append(message.tool_call_id)
    if isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls):
        # As ChatOpenAI sends them; ASCII-escaped JSON, which counts more than the raw text.
        calls: list[dict[str, Any]] = [
            {"type": "function", "id": c["id"], "function": {"name": c["name"], "arguments": a}}
            for c, a in [
                *((c, json.dumps(c["args"], ensure_ascii=False)) for c in message.tool_calls),
                *((c, c.get("args") or "") for c in message.invalid_tool_calls),
            ]
        ]
        texts.append(json.dumps(calls))
    return texts


def _encodable(text: str) -> str:
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


# A call to `toktok.batch_count` costs about 30 µs of CPU whatever it counts, more than a
# prompt's few texts take; `toktok.truncate` counts one text (the whole of it: with no cap it
# cuts nothing) for about 1 µs plus its length. A turn's prompt has a few dozen texts: below
# `_BATCH_FROM` they are counted one by one (measured: equal near 100 texts of 40 tokens).
_BATCH_FROM = 64


def _count_texts(texts: list[str], encoding: str) -> int:
    if len(texts) < _BATCH_FROM:
        return sum(toktok.truncate(text, sys.maxsize, encoding)[1] for text in texts)
    return sum(toktok.batch_count(texts, encoding, threads=1))


def _openai_counter(encoding: str) -> TokenCounter:
    def count(messages: Sequence[BaseMessage]) -> int:
        texts = [text for message in messages for text in _texts(message)]
        names = sum(1 for message in messages if message.name)
        try:
            tokens = _count_texts(texts, encoding)
        except UnicodeEncodeError:  # a lone surrogate (half an emoji): as U+FFFD, like a store
            tokens = _count_texts([_encodable(t) for t in texts], encoding)
        overhead = _OPENAI_PER_MESSAGE * len(messages) + _OPENAI_PER_NAME * names
        return int(tokens) + overhead + _OPENAI_PER_REQUEST

    return TokenCounter(encoding, count)


def _count_bytes(messages: Sequence[BaseMessage]) -> int:
    text = sum(len(t.encode("utf-8", "surrogatepass")) for m in messages for t in _texts(m))
    return text + _BYTES_PER_MESSAGE * len(messages) + _BYTES_PER_REQUEST


_ENCODINGS = ("o200k_base", "cl100k_base")
APPROXIMATE = TokenCounter("approximate", count_tokens_approximately)
UTF8_BYTES = TokenCounter("utf8-bytes", _count_bytes)
EXACT = {name: _openai_counter(name) for name in _ENCODINGS}

# Names of OpenAI's models tiktoken's table may not list yet: the newest encoding.
_OPENAI_NAMES = re.compile(r"(gpt-[45]|chatgpt-|o[1-9](-|$)|gpt-5)")


def _load(encoding: str) -> None:
    """Load ``encoding`` now (about a second, once a process) rather than in a first turn,
    where it would count against the turn's deadline."""
    toktok.batch_count([""], encoding, threads=1)


def encoding_of(model_name: str) -> str | None:
    """OpenAI's encoding for ``model_name`` (``"o200k_base"`` or ``"cl100k_base"``), or
    ``None`` when the model's tokenizer is not one of them (or not known).

    A provider prefix (``openrouter/gpt-4o-mini``) is ignored; tiktoken's table of model
    names (pure data, nothing is downloaded) decides, and OpenAI's models it does not list
    yet (``gpt-5.1``) get OpenAI's newest encoding.

    Example:
        >>> encoding_of("gpt-4o-mini"), encoding_of("gpt-4"), encoding_of("llama3.1:8b")
        ('o200k_base', 'cl100k_base', None)
    """
    name = model_name.rsplit("/", 1)[-1].strip().lower()
    try:
        from tiktoken.model import encoding_name_for_model

        encoding: str | None = encoding_name_for_model(name)
    except (ImportError, KeyError):
        encoding = "o200k_base" if _OPENAI_NAMES.match(name) else None
    return encoding if encoding in _ENCODINGS else None


def choose_counter(model: Any, setting: CounterSetting = "auto") -> TokenCounter:
    """The counter for ``model``: exact for OpenAI's models, else the UTF-8 bytes bound.

    Args:
        model: The chat model (its ``model_name`` says which tokenizer bills it).
        setting: ``CHATCHAIN_TOKEN_COUNTER``: ``auto``; ``exact`` (refuse a model whose
            encoding is unknown); ``utf8-bytes`` (for a server that names its model like
            OpenAI's but runs another); ``approximate`` (LangChain's estimate, can be low).

    Raises:
        ConfigurationError: ``setting`` is ``"exact"`` but the model's encoding is unknown.

    Example:
        >>> from langchain_openai import ChatOpenAI
        >>> choose_counter(ChatOpenAI(model="gpt-4o-mini", api_key="k")).name
        'o200k_base'
        >>> choose_counter(ChatOpenAI(model="qwen2.5:7b", api_key="k")).name
        'utf8-bytes'
    """
    model = getattr(model, "runnable", model)  # the main model of a RunnableWithFallbacks
    model = getattr(model, "bound", model)  # a model with .bind(...)
    if setting == "approximate":
        return APPROXIMATE
    if setting == "utf8-bytes":
        return UTF8_BYTES
    # A model that says how it bills (chatchain.testing's FakeChatModel bills approximately).
    own = {c.name: c for c in (APPROXIMATE, UTF8_BYTES, *EXACT.values())}.get(
        str(getattr(model, "chatchain_token_counter", ""))
    )
    if own is not None and setting == "auto":
        return own
    model_name = getattr(model, "model_name", None)
    encoding = encoding_of(model_name) if isinstance(model_name, str) else None
    if encoding is not None:
        _load(encoding)
        return EXACT[encoding]
    if setting in ("exact", "tiktoken"):  # "tiktoken": 0.1.0's name for it
        raise ConfigurationError(
            f"CHATCHAIN_TOKEN_COUNTER={setting}, but the tokenizer of model {model_name!r} is not "
            "one of OpenAI's encodings (o200k_base, cl100k_base). Set "
            "CHATCHAIN_TOKEN_COUNTER=auto to count it with the UTF-8 bytes bound."
        )
    return UTF8_BYTES
