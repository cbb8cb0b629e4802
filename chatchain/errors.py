"""The errors chatchain raises, one tree with one root.

Every message says what happened and what to do next; the original exception, when there is
one, is chained as ``__cause__``. No message ever contains the API key.

```
ChatChainError
├── ConfigurationError          settings that cannot work (bad value, missing key)
│   └── MissingAPIKeyError      no OPENAI_API_KEY and no OPENAI_BASE_URL
├── InvalidInputError           bad text, session id or prompt variables; nothing was sent
│   ├── MissingPromptVariableError
│   ├── SessionExistsError      an import would overwrite a session, and replacing was not asked
│   ├── UserExistsError         a user of that name exists already
│   └── UnknownUserError        no user of that name
├── SessionBusyError            another turn held the session for longer than the lock timeout
├── SessionLockLostError        the turn lost its session lock; its reply was not saved
├── BudgetExceeded              a cap cannot pay for the turn at all; nothing was sent or stored
├── StoreError                  the history store failed; nothing of the turn was saved
│   └── TurnJournaledError      ...as a finished turn was saved: it waits in a local journal
└── EndpointError               the chat endpoint failed; the history is unchanged
    ├── AuthenticationError     401/403: the key is wrong or lacks access
    ├── RateLimitError          429 after the client's own retries
    ├── EndpointTimeoutError    no answer within the timeout, or 408, after retries
    │   └── TurnDeadlineError   the whole turn ran past CHATCHAIN_TURN_DEADLINE
    ├── EndpointConnectionError the endpoint could not be reached
    ├── ContextTooLongError     the prompt does not fit the model's context window
    ├── BadRequestError         400/404/422: the endpoint refused the request
    ├── ServerError             5xx after retries, or a reply that could not be read
    └── StructuredReplyError    a structured reply (schema=..., a json_schema response_format)
                                did not validate; nothing stored
```

`InvalidInputError` is also a `ValueError`, so code written against LangChain's own
`ValueError` for bad input keeps working.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

if typing.TYPE_CHECKING:
    from langchain_core.messages import BaseMessage

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "BudgetExceeded",
    "ChatChainError",
    "ConfigurationError",
    "ContextTooLongError",
    "EndpointConnectionError",
    "EndpointError",
    "EndpointTimeoutError",
    "InvalidInputError",
    "MissingAPIKeyError",
    "MissingPromptVariableError",
    "RateLimitError",
    "ServerError",
    "SessionBusyError",
    "SessionExistsError",
    "SessionLockLostError",
    "StoreError",
    "StructuredReplyError",
    "TurnDeadlineError",
    "TurnJournaledError",
    "UnknownUserError",
    "UserExistsError",
]


class ChatChainError(Exception):
    """Root of every error chatchain raises."""


class ConfigurationError(ChatChainError):
    """The settings cannot work: a value is malformed or a required one is missing."""


class MissingAPIKeyError(ConfigurationError):
    """Neither an API key nor a base URL of a local server is configured."""


class InvalidInputError(ChatChainError, ValueError):
    """The turn's input is unusable; nothing was sent and nothing was stored."""


class MissingPromptVariableError(InvalidInputError):
    """The prompt template needs a variable that neither the call nor the chain supplies."""


class SessionExistsError(InvalidInputError):
    """An import would overwrite a session that holds messages, and replacing was not asked.

    Attributes:
        session_id: The id of the session that exists.
    """

    def __init__(self, message: str, *, session_id: str) -> None:
        super().__init__(message)
        self.session_id = session_id


class UserExistsError(InvalidInputError):
    """A user of that name exists already (`chatchain.users.Users.add`); nothing changed."""


class UnknownUserError(InvalidInputError):
    """No user of that name (`chatchain.users.Users`); nothing changed."""


class SessionBusyError(ChatChainError):
    """Another turn kept the session locked for longer than the lock timeout."""


class SessionLockLostError(ChatChainError):
    """The turn's session lock expired while it ran (the process or the store stalled for
    longer than the lock's lease) and another turn took the session.

    The store refused to write this turn's messages, so the two turns cannot interleave in
    the history; the usage was recorded all the same, since the endpoint billed the call.
    Nothing is lost: the reply that was not saved is on the error.

    Attributes:
        session_id: The session.
        reply: The text of the reply that was not saved.
        messages: The turn's messages that were not saved (the input and the reply).
    """

    def __init__(
        self, message: str, *, session_id: str, reply: str, messages: list[BaseMessage]
    ) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.reply = reply
        self.messages = messages


class BudgetExceeded(ChatChainError):
    """A turn cannot pay for its prompt and even one reply token under a spending cap
    (``CHATCHAIN_BUDGET_*``); nothing was sent or stored. (A turn that can pay for some
    reply is sent with ``max_tokens`` cut to what the cap has left, and a notice.)

    Attributes:
        scope: ``"session"``, ``"user"`` or ``"all"``.
        key: The session or user id (``""`` for ``"all"``).
        limit_usd: The cap in USD, if the refused cap is in USD.
        limit_tokens: The cap in tokens, if the refused cap is in tokens.
        spent_usd: What the scope has spent (plus turns in flight).
        spent_tokens: Tokens the scope has spent (plus turns in flight).
        needed_usd: The least the turn would cost (its prompt and one reply token).
        needed_tokens: The fewest tokens the turn would take (its prompt + 1).
    """

    def __init__(
        self,
        message: str,
        *,
        scope: str,
        key: str,
        limit_usd: float | None,
        limit_tokens: int | None,
        spent_usd: float,
        spent_tokens: int,
        needed_usd: float,
        needed_tokens: int,
    ) -> None:
        super().__init__(message)
        self.scope = scope
        self.key = key
        self.limit_usd = limit_usd
        self.limit_tokens = limit_tokens
        self.spent_usd = spent_usd
        self.spent_tokens = spent_tokens
        self.needed_usd = needed_usd
        self.needed_tokens = needed_tokens


class StoreError(ChatChainError):
    """The history store could not be read or written (down, full, locked or corrupted).

    Nothing of the failed operation was stored; the message names the store and what to check.
    """


class TurnJournaledError(StoreError):
    """The store failed as a finished turn was being saved, after the endpoint had answered
    (and billed) it. The turn (its messages and its usage) was kept in a local journal
    instead, and is saved to the store when it is reachable again (the session's next turn,
    or any turn after it, replays it): nothing is lost, and nothing is counted twice.

    Do not send the message again: it was answered and billed.

    Attributes:
        session_id: The session.
        reply: The text of the reply, delivered but not yet in the history.
        journal: The journal file the turn waits in.
        entry_id: The id of the turn's usage entry (the ledger's once it is saved).
    """

    def __init__(
        self, message: str, *, session_id: str, reply: str, journal: str, entry_id: str
    ) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.reply = reply
        self.journal = journal
        self.entry_id = entry_id


class EndpointError(ChatChainError):
    """The chat endpoint failed. The turn changed nothing in the history.

    Attributes:
        status_code: The HTTP status the endpoint answered with, when there was one.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthenticationError(EndpointError):
    """The endpoint refused the API key (401) or its permissions (403)."""


class RateLimitError(EndpointError):
    """The endpoint kept answering 429 after the client's retries."""


class EndpointTimeoutError(EndpointError):
    """The endpoint did not answer within the timeout, or a gateway answered 408 Request
    Timeout, after the client's retries."""


class TurnDeadlineError(EndpointTimeoutError):
    """The whole turn ran past its deadline (``CHATCHAIN_TURN_DEADLINE``) and was stopped.

    The endpoint kept answering too slowly to trip ``CHATCHAIN_TIMEOUT`` (which bounds each
    read), e.g. with keep-alive comments or a body a byte at a time. Nothing was stored, except
    the reply a stream had already shown, which is kept, marked interrupted. The session's lock
    was released.
    """


class EndpointConnectionError(EndpointError):
    """The endpoint could not be reached at all."""


class ContextTooLongError(EndpointError):
    """The prompt (system, history and input) does not fit the model's context window."""


class BadRequestError(EndpointError):
    """The endpoint refused the request as malformed or unsupported."""


class ServerError(EndpointError):
    """The endpoint failed on its side (5xx), or answered with something unreadable."""


class StructuredReplyError(EndpointError):
    """The model's reply to a structured turn (``schema=...``) does not fit the schema: not
    JSON, a field missing or of the wrong type, a refusal, or cut short by ``max_tokens``.

    Nothing was stored in the history; the call was metered (the endpoint billed it).

    Attributes:
        schema: The pydantic model the reply had to fit, or the JSON schema of a
            ``response_format`` (see `chatchain.ModelOptions`).
        text: The reply as the model gave it (its JSON text or tool-call arguments).
    """

    def __init__(self, message: str, *, schema: type | Mapping[str, Any], text: str) -> None:
        super().__init__(message)
        self.schema = schema
        self.text = text
