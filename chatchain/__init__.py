"""chatchain: a production-grade conversational chain on LangChain and OpenAI-compatible APIs.

Example:
    >>> from chatchain import Chatbot
    >>> from chatchain.testing import FakeChatModel
    >>> bot = Chatbot(llm=FakeChatModel(replies=["Hello Bob!"]))
    >>> bot.chat("Hi, I'm Bob").text
    'Hello Bob!'
"""

import logging as _logging
from typing import Any as _Any

from chatchain._async_clients import aclose_loop_client
from chatchain._metering import get_openai_callback
from chatchain._money import format_usd
from chatchain._options import ModelOptions, ToolCallDelta
from chatchain._renamed import warn_renamed as _warn_renamed
from chatchain._tools import ToolFinished, ToolRun, ToolStarted
from chatchain._turn import MAX_SESSION_ID_LENGTH, validate_session_id
from chatchain.budgets import Budget
from chatchain.chain import ChatChain, create_chat_chain, get_message_history
from chatchain.chatbot import AsyncReplyStream, Chatbot, Reply, ReplyStream
from chatchain.errors import (
    AuthenticationError,
    BadRequestError,
    BudgetExceeded,
    ChatChainError,
    ConfigurationError,
    ContextTooLongError,
    EndpointConnectionError,
    EndpointError,
    EndpointTimeoutError,
    InvalidInputError,
    MissingAPIKeyError,
    MissingPromptVariableError,
    RateLimitError,
    ServerError,
    SessionBusyError,
    SessionExistsError,
    SessionLockLostError,
    StoreError,
    StructuredReplyError,
    TurnDeadlineError,
    TurnJournaledError,
    UnknownUserError,
    UserExistsError,
)
from chatchain.hooks import (
    FirstToken,
    ModelCallEnded,
    ModelCallStarted,
    StoreCommitted,
    ToolCallEnded,
    ToolCallStarted,
    TurnEnded,
    TurnHooks,
    TurnInfo,
    TurnStarted,
)
from chatchain.model import create_chat_model, create_summary_model
from chatchain.pricing import ModelPrice
from chatchain.prompt import create_prompt
from chatchain.settings import Settings
from chatchain.stores import HistoryStore, MemoryStore, open_store
from chatchain.usage import Usage, UsageEntry, UsageLedger, UsageReport
from chatchain.window import HistoryWindow

# Plainly sorted (tests/test_public_api.py), not isort-style (constants first) as RUF022 wants.
__all__ = [  # noqa: RUF022
    "AsyncReplyStream",
    "AuthenticationError",
    "BadRequestError",
    "Budget",
    "BudgetExceeded",
    "ChatChain",
    "ChatChainError",
    "Chatbot",
    "ConfigurationError",
    "ContextTooLongError",
    "EndpointConnectionError",
    "EndpointError",
    "EndpointTimeoutError",
    "FirstToken",
    "HistoryStore",
    "HistoryWindow",
    "InvalidInputError",
    "MAX_SESSION_ID_LENGTH",
    "MemoryStore",
    "MissingAPIKeyError",
    "MissingPromptVariableError",
    "ModelCallEnded",
    "ModelCallStarted",
    "ModelOptions",
    "ModelPrice",
    "RateLimitError",
    "Reply",
    "ReplyStream",
    "ServerError",
    "SessionBusyError",
    "SessionExistsError",
    "SessionLockLostError",
    "Settings",
    "StoreCommitted",
    "StoreError",
    "StructuredReplyError",
    "ToolCallDelta",
    "ToolCallEnded",
    "ToolCallStarted",
    "ToolFinished",
    "ToolRun",
    "ToolStarted",
    "TurnDeadlineError",
    "TurnEnded",
    "TurnHooks",
    "TurnInfo",
    "TurnJournaledError",
    "TurnStarted",
    "UnknownUserError",
    "Usage",
    "UsageEntry",
    "UsageLedger",
    "UsageReport",
    "UserExistsError",
    "aclose_loop_client",
    "create_chat_chain",
    "create_chat_model",
    "create_prompt",
    "create_summary_model",
    "format_usd",
    "get_message_history",
    "get_openai_callback",
    "open_store",
    "validate_session_id",
]

# The one place the version is written: the build reads it from here (pyproject.toml's
# [tool.setuptools.dynamic]), so the installed package's metadata says the same.
__version__ = "0.1.0"

# Old public names, each an alias that warns with its new name.
_RENAMED = {"ToolCall": "ToolRun"}


def __getattr__(name: str) -> _Any:
    if name in _RENAMED:
        new = _RENAMED[name]
        _warn_renamed(f"chatchain.{name}", f"chatchain.{new}")
        return globals()[new]
    raise AttributeError(f"module 'chatchain' has no attribute {name!r}")


# A library's logger stays silent unless the application configures logging.
_logging.getLogger("chatchain").addHandler(_logging.NullHandler())
