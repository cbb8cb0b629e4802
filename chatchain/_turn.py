"""One turn's bookkeeping, shared by every entry point so that they cannot drift.

A turn is: validate the input, take the session's lock, run the model with a fresh usage
handler, then save the user's message and the reply in one bulk write and record the usage.
A failed turn saves nothing; an interrupted stream saves the user's message and the partial
reply, marked ``interrupted`` in the reply's ``response_metadata``.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, message_chunk_to_message
from langchain_core.messages.ai import add_ai_message_chunks
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config, merge_configs

from chatchain import _endpoint_errors, _metering
from chatchain.errors import InvalidInputError, MissingPromptVariableError
from chatchain.memory import Memory
from chatchain.stores import HistoryStore
from chatchain.usage import Usage, UsageLedger

__all__ = ["MAX_SESSION_ID_LENGTH", "Turn", "TurnSpec", "validate_session_id"]

logger = logging.getLogger("chatchain")

MAX_SESSION_ID_LENGTH = 256
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})  # controls, surrogates, line breaks


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it can key a session, else raise a clear error.

    Raises:
        InvalidInputError: Not a string, empty, longer than 256 characters, or holding
            control characters or line breaks.
    """
    if not isinstance(session_id, str):
        raise InvalidInputError(
            f"The session id must be a string, not {type(session_id).__name__}: "
            "pass session_id='...'."
        )
    if not session_id.strip():
        raise InvalidInputError("The session id is empty: pass a non-blank session_id.")
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        raise InvalidInputError(
            f"The session id is {len(session_id)} characters long; the limit is "
            f"{MAX_SESSION_ID_LENGTH}. Use a shorter id (a UUID or a hash of yours)."
        )
    bad = next((ch for ch in session_id if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES), None)
    if bad is not None:
        raise InvalidInputError(
            f"The session id holds the control character U+{ord(bad):04X}: remove it."
        )
    return session_id


def _validate_text(text: str, where: str) -> None:
    if not text.strip():
        raise InvalidInputError(f"The {where} is empty: send some text.")
    if "\x00" in text:
        raise InvalidInputError(
            f"The {where} holds a NUL character (\\x00), which stores cannot keep: remove it."
        )


def _text_of(message: BaseMessage) -> str:
    return message.text if isinstance(message.text, str) else str(message.content)


@dataclass(frozen=True)
class TurnSpec:
    """What a chain knows about its turns: keys, required variables and where to save.

    Attributes:
        input_key: The input dict's key for the user's text or messages.
        required_vars: Prompt variables the call must supply (those without a default).
        get_history: The chain's ``get_session_history``.
        ledger: Where each turn's usage is recorded.
        memory: The window and summary policy.
        store: The chain's store, when ``get_history`` is one (windowed loads, summaries).
        default_model: The model to price a turn with when the reply does not name one
            (an interrupted stream never receives the chunk that does).
        describe_failure: Turns an endpoint exception into a chatchain error, or ``None``.
    """

    input_key: str | None
    required_vars: frozenset[str]
    get_history: Callable[[str], BaseChatMessageHistory]
    ledger: UsageLedger
    memory: Memory
    store: HistoryStore | None = None
    default_model: str | None = None
    describe_failure: Callable[[BaseException], Exception | None] = _endpoint_errors.translate

    def begin(
        self,
        value: Any,
        config: RunnableConfig | None,
        input_messages: Callable[[Any], list[BaseMessage]],
    ) -> Turn:
        """Validate a call and open its turn; nothing is sent or stored yet.

        Raises:
            InvalidInputError: The input, the session id or a prompt variable is unusable.
        """
        config = ensure_config(config)
        configurable = config.get("configurable", {})
        if "session_id" not in configurable:
            raise InvalidInputError(
                "No session id: call the chain with "
                "config={'configurable': {'session_id': 'your-session'}}."
            )
        session_id = validate_session_id(configurable["session_id"])
        self._check_input(value)
        messages = input_messages(value)
        for message in messages:
            if message.type == "human":
                _validate_text(_text_of(message), "message")
        handler = _metering.new_handler()
        if config.get("callbacks"):
            config = merge_configs(config, {"callbacks": [handler]})
        else:  # the common case, without merge_configs' general (and slower) path
            config = {**config, "callbacks": [handler]}
        return Turn(
            spec=self,
            session_id=session_id,
            config=config,
            input_messages=messages,
            handler=handler,
        )

    def _check_input(self, value: Any) -> None:
        if self.input_key is None:
            if not isinstance(value, (str, BaseMessage, Sequence)) or not value:
                raise InvalidInputError("The input is empty: send some text or messages.")
            return
        if not isinstance(value, Mapping):
            raise InvalidInputError(
                f"The chain takes a dict, e.g. {{{self.input_key!r}: 'hi'}} plus any prompt "
                f"variables, not {type(value).__name__}."
            )
        if self.input_key not in value:
            raise InvalidInputError(
                f"The input has no {self.input_key!r} key: pass {{{self.input_key!r}: 'hi'}}."
            )
        text = value[self.input_key]
        if isinstance(text, str):
            _validate_text(text, "message")
        elif not isinstance(text, (BaseMessage, Sequence)) or not text:
            raise InvalidInputError(
                f"{self.input_key!r} must be text, a message or a non-empty list of messages."
            )
        missing = sorted(self.required_vars - set(value))
        if missing:
            names = ", ".join(f"{{{name}}}" for name in missing)
            example = ", ".join(f"{name}=..." for name in missing)
            raise MissingPromptVariableError(
                f"The prompt needs {names} but the call does not supply it. Pass {example} "
                "with the call, or give the chain a default with prompt_vars={...}."
            )


@dataclass
class Turn:
    """One open turn: its session, config (with its usage handler) and what it produced."""

    spec: TurnSpec
    session_id: str
    config: RunnableConfig
    input_messages: list[BaseMessage]
    handler: Any
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    _chunks: list[AIMessageChunk] = field(default_factory=list)
    usage: Usage | None = None
    notices: list[str] = field(default_factory=list)
    """Things the user should know about the turn (e.g. a retry with a tighter window)."""

    def start_clock(self) -> None:
        """Restart the clock once the lock is held, so that waiting is not latency."""
        self.started = time.perf_counter()

    def add_chunk(self, chunk: Any) -> None:
        """Fold one streamed chunk into the reply."""
        if not isinstance(chunk, AIMessageChunk):
            return
        if self.first_token_s is None and chunk.content:
            self.first_token_s = time.perf_counter() - self.started
        self._chunks.append(chunk)  # merged once at the end: merging per chunk is quadratic

    @property
    def has_reply(self) -> bool:
        return bool(self._chunks)

    def streamed_reply(self) -> BaseMessage:
        """The reply assembled from the streamed chunks."""
        if not self._chunks:
            return AIMessage(content="")
        return message_chunk_to_message(add_ai_message_chunks(*self._chunks))

    def partial_reply(self, reason: str) -> AIMessage:
        """What arrived before the stream stopped, marked as interrupted."""
        reply = self.streamed_reply()
        metadata = {**reply.response_metadata, "interrupted": True, "interrupted_reason": reason}
        return AIMessage(
            content=reply.content,
            id=reply.id,
            response_metadata=metadata,
            usage_metadata=getattr(reply, "usage_metadata", None),
        )

    def _finish(self, reply: BaseMessage) -> list[BaseMessage]:
        model = reply.response_metadata.get("model_name") or self.spec.default_model
        self.usage = _metering.usage_from(
            self.handler,
            model=model,
            latency_s=time.perf_counter() - self.started,
            first_token_s=self.first_token_s,
        )
        self.spec.ledger.record(self.session_id, self.usage)
        return [*self.input_messages, reply]

    def save(self, reply: BaseMessage) -> None:
        """Store the user's message and the reply in one write, and record the usage."""
        messages = self._finish(reply)
        if self.spec.store is not None:
            self.spec.store.append(self.session_id, messages)
        else:
            self.spec.get_history(self.session_id).add_messages(messages)

    async def asave(self, reply: BaseMessage) -> None:
        """`save` for async callers."""
        messages = self._finish(reply)
        if self.spec.store is not None:
            await self.spec.store.aappend(self.session_id, messages)
        else:
            await self.spec.get_history(self.session_id).aadd_messages(messages)

    def summarize(self) -> None:
        """Fold old turns into the running summary first, if due (a separate metered call)."""
        if self.spec.store is None:
            return
        try:
            usage = self.spec.memory.summarize(self.spec.store, self.session_id)
        except Exception as exc:  # the turn can go on without a fresher summary
            self._summary_failed(exc)
            return
        self._record_summary(usage)

    async def asummarize(self) -> None:
        """`summarize` for async callers."""
        if self.spec.store is None:
            return
        try:
            usage = await self.spec.memory.asummarize(self.spec.store, self.session_id)
        except Exception as exc:
            self._summary_failed(exc)
            return
        self._record_summary(usage)

    def _record_summary(self, usage: Usage | None) -> None:
        if usage is not None:
            self.spec.ledger.record(self.session_id, replace(usage, turns=0, summaries=1))

    def _summary_failed(self, exc: Exception) -> None:
        error = self.spec.describe_failure(exc) or exc
        self.notices.append(
            f"The running summary could not be updated ({error}); "
            "the turn went on with the window alone."
        )
        logger.warning("Summary on session %r failed: %s", self.session_id, error)

    def notice(self, text: str) -> None:
        """Tell the user something about this turn (kept on the reply, and logged)."""
        self.notices.append(text)
        logger.warning("Session %r: %s", self.session_id, text)

    def failure(self, exc: BaseException) -> Exception | None:
        """The chatchain error for a failure of the endpoint, or ``None`` to re-raise as is."""
        error = self.spec.describe_failure(exc)
        if error is not None:
            logger.warning("Turn on session %r failed: %s", self.session_id, error)
        return error

    def log_interrupted(self, reason: str) -> None:
        logger.info(
            "Stream on session %r interrupted (%s); partial reply kept.", self.session_id, reason
        )
