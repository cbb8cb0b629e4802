"""Token counting that works offline: exact where tiktoken's encoding is at hand, else approximate.

tiktoken downloads its encodings on first use, and this may run with no network: asking for a
missing encoding would hang or fail mid-turn. So the exact counter is used only when the
encoding file is already in tiktoken's cache (``TIKTOKEN_CACHE_DIR``, or the default cache
folder); otherwise LangChain's `count_tokens_approximately` counts. The choice is visible as
`TokenCounter.name` (and logged once per chain).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import BaseMessage, SystemMessage
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.utils.function_calling import convert_to_openai_tool

from chatchain.errors import ConfigurationError

__all__ = ["TokenCounter", "choose_counter"]

logger = logging.getLogger("chatchain")

_ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

CounterSetting = Literal["auto", "approximate", "tiktoken"]


@dataclass(frozen=True)
class TokenCounter:
    """Counts the tokens of messages as the endpoint would bill them.

    Attributes:
        name: ``"tiktoken:<encoding>"`` when exact, ``"approximate"`` otherwise.
        count: The counting function.
    """

    name: str
    count: Callable[[Sequence[BaseMessage]], int]

    @property
    def exact(self) -> bool:
        return self.name.startswith("tiktoken")

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


APPROXIMATE = TokenCounter("approximate", count_tokens_approximately)


def _encoding_is_cached(name: str) -> bool:
    # Mirrors tiktoken.load.read_file_cached: the cache file is the SHA-1 of the blob URL.
    cache_dir = os.environ.get(
        "TIKTOKEN_CACHE_DIR",
        os.environ.get("DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")),
    )
    if not cache_dir:
        return False
    key = hashlib.sha1(_ENCODING_URL.format(name=name).encode()).hexdigest()
    return os.path.exists(os.path.join(cache_dir, key))


def _tiktoken_counter(model: Any) -> TokenCounter | None:
    count = getattr(model, "get_num_tokens_from_messages", None)
    model_name = getattr(model, "model_name", None)
    if count is None or not isinstance(model_name, str):
        return None
    try:
        import tiktoken

        encoding = tiktoken.encoding_name_for_model(model_name)
    except (ImportError, KeyError):
        encoding = "o200k_base"  # what langchain-openai falls back to for unknown models
    if not _encoding_is_cached(encoding):
        return None
    return TokenCounter(f"tiktoken:{encoding}", lambda messages: int(count(list(messages))))


def choose_counter(model: Any, setting: CounterSetting = "auto") -> TokenCounter:
    """The counter for ``model``: exact if its tiktoken encoding is cached, else approximate.

    Raises:
        ConfigurationError: ``setting`` is ``"tiktoken"`` but the encoding is not cached.
    """
    model = getattr(model, "runnable", model)  # the main model of a RunnableWithFallbacks
    if setting == "approximate":
        return APPROXIMATE
    counter = _tiktoken_counter(model)
    if counter is not None:
        return counter
    if setting == "tiktoken":
        raise ConfigurationError(
            "CHATCHAIN_TOKEN_COUNTER=tiktoken, but tiktoken's encoding for this model is not "
            "cached and cannot be downloaded here. Put the encoding file in TIKTOKEN_CACHE_DIR, "
            "or set CHATCHAIN_TOKEN_COUNTER=auto to count approximately."
        )
    return APPROXIMATE
