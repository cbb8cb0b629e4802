"""One interface over every way a turn is run: the Chatbot's four and the service's routes.

Each adapter runs a turn with ``run(text, session=..., stop_after=...)`` and gives back an
`Outcome`; ``history`` and ``entries`` read what the store and the ledger kept of a session
(the service keys it ``"ann:<session>"``). An adapter that cannot express a rule says so
with ``pytest.skip`` and the reason, so that no pair is left out silently.

The HTTP routes run in this process: FastAPI's TestClient for whole requests, and, for a
client that leaves mid-stream (which TestClient cannot do: it reads each response whole),
`leave_after`, which drives the ASGI app itself and sends ``http.disconnect`` once the
client has read enough.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fastapi.testclient import TestClient
from langchain_core.messages import BaseMessage
from starlette.types import ASGIApp, Message

from chatchain import (
    Chatbot,
    ChatChainError,
    ModelPrice,
    Settings,
    ToolFinished,
    ToolStarted,
    Usage,
    UsageEntry,
)
from chatchain.server import create_app
from chatchain.stores import SQLiteStore
from chatchain.testing import FakeChatModel
from chatchain.users import Users

__all__ = ["ENTRY_POINTS", "PRICE", "EntryPoint", "Outcome", "make_entry_point"]

PRICE = 1000.0
"""USD per million tokens both ways for the model of every entry point: $0.001 a token."""

SYSTEM = "Be brief."
USER = "ann"  # the service's user: its sessions are "ann:<session>" in the store

Tokens = tuple[int, int, int]
ToolEvent = ToolStarted | ToolFinished
"""Prompt, completion and total tokens."""


@dataclass(frozen=True)
class Outcome:
    """What one turn gave back, whichever way it was run.

    Attributes:
        text: The reply's text as the caller received it (what arrived before an error or
            before the caller stopped).
        tokens: Prompt, completion and total tokens the reply reports; ``None`` when it
            reported none (a failed turn).
        cost: The cost in USD the reply reports.
        notices: What the reply told the user; ``None`` where the entry point has no way to
            say it (the OpenAI route).
        error_kind: The chatchain error class that ended the turn, ``None`` if it did not
            fail (over HTTP, read back from the error body).
        error_message: The error's message, as the caller reads it.
        status: The HTTP status of the answer (``None`` in the library); 200 for an error
            that came as an event of a stream already begun.
        events: Tool events and text in the order the caller saw them: ``"started:add"``,
            ``"finished:add"``, and ``"text"`` for each run of text.
    """

    text: str = ""
    tokens: Tokens | None = None
    cost: float | None = None
    notices: tuple[str, ...] | None = ()
    error_kind: str | None = None
    error_message: str = ""
    status: int | None = None
    events: tuple[str, ...] = ()


def _tokens(usage: Usage | None) -> Tokens | None:
    if usage is None:
        return None
    return (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


class _Events:
    """Collects tool events and text runs in order, as `Outcome.events` lists them."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def tool(self, event: ToolEvent) -> None:
        if isinstance(event, ToolStarted):
            self.seen.append(f"started:{event.name}")
        elif isinstance(event, ToolFinished):
            self.seen.append(f"finished:{event.call.name}")

    def text(self, piece: str) -> None:
        if piece and (not self.seen or self.seen[-1] != "text"):
            self.seen.append("text")


@dataclass
class EntryPoint:
    """One way of running a turn over a Chatbot of the test's own on a SQLite file.

    `open` builds the bot (again, with other settings, if a test needs to); the store
    stays, so what a turn kept is read from it whichever bot wrote it.
    """

    name: str
    folder: Path
    store: SQLiteStore = field(init=False)
    bot: Chatbot = field(init=False)
    fake: FakeChatModel = field(init=False)

    def __post_init__(self) -> None:
        self.store = SQLiteStore(self.folder / "chat.db")

    def open(
        self, fake: FakeChatModel | None = None, *, tools: Sequence[Any] = (), **values: Any
    ) -> Chatbot:
        """A Chatbot over ``fake`` (an echo by default) with these settings' values."""
        self.fake = fake or FakeChatModel(model_name="gpt-4o-mini")
        settings = Settings(
            api_key="sk-test-0123456789abcdef",
            model="gpt-4o-mini",
            prices={"gpt-4o-mini": ModelPrice(input=PRICE, output=PRICE)},
            lock_timeout=5.0,
            window_turns=None,
            window_tokens=None,
            summarize=False,
            server_requests_per_minute=0,
            **values,
        )
        self.bot = Chatbot(settings, llm=self.fake, store=self.store, system=SYSTEM, tools=tools)
        return self.bot

    def store_id(self, session: str) -> str:
        """The store's id of ``session``."""
        return session

    def history(self, session: str = "s") -> list[BaseMessage]:
        """What the store keeps of ``session``."""
        return self.store.load(self.store_id(session))

    def entries(self, session: str = "s") -> list[UsageEntry]:
        """The ledger's entries of ``session``."""
        return self.bot.usage_entries(session_id=self.store_id(session))

    def seed(self, messages: Iterable[BaseMessage], session: str = "s") -> None:
        """Write earlier turns straight to the store."""
        self.store.append(self.store_id(session), list(messages))

    def status_for(self, error_kind: str) -> int | None:
        """The HTTP status this entry point answers a turn refused with ``error_kind``."""
        return None

    def run(
        self, text: str, *, session: str = "s", stop_after: int | None = None, events: bool = False
    ) -> Outcome:
        """One turn; ``stop_after``: the caller stops after that many pieces of text;
        ``events``: the rule reads the tool events (`Outcome.events`)."""
        raise NotImplementedError

    def close(self) -> None:
        if hasattr(self, "bot"):
            self.bot.close()
        self.store.close()


def _failed(exc: ChatChainError, text: str = "", events: Sequence[str] = ()) -> Outcome:
    return Outcome(
        text=text,
        error_kind=type(exc).__name__,
        error_message=str(exc),
        events=tuple(events),
    )


class Chat(EntryPoint):
    """``Chatbot.chat`` (and ``achat``, its async twin): the whole reply at once."""

    def run(
        self, text: str, *, session: str = "s", stop_after: int | None = None, events: bool = False
    ) -> Outcome:
        if stop_after is not None:
            pytest.skip(f"{self.name} returns the whole reply: a caller cannot stop it midway")
        seen = _Events()
        try:
            reply = self._reply(text, session, seen.tool)
        except ChatChainError as exc:
            return _failed(exc, events=seen.seen)
        seen.text(reply.text)
        return Outcome(
            text=reply.text,
            tokens=_tokens(reply.usage),
            cost=reply.usage.cost_usd,
            notices=reply.notices,
            events=tuple(seen.seen),
        )

    def _reply(self, text: str, session: str, on_tool: Callable[[ToolEvent], None]) -> Any:
        return self.bot.chat(text, session_id=session, on_tool=on_tool)


class AChat(Chat):
    def _reply(self, text: str, session: str, on_tool: Callable[[ToolEvent], None]) -> Any:
        return asyncio.run(self.bot.achat(text, session_id=session, on_tool=on_tool))


class Stream(EntryPoint):
    """``Chatbot.stream``: its events (text pieces and tool events); closed to stop early."""

    def run(
        self, text: str, *, session: str = "s", stop_after: int | None = None, events: bool = False
    ) -> Outcome:
        stream = self.bot.stream(text, session_id=session)
        seen, pieces = _Events(), []
        try:
            with stream:
                for event in stream.events():
                    if isinstance(event, str):
                        pieces.append(event)
                        seen.text(event)
                        if stop_after is not None and len(pieces) >= stop_after:
                            break
                    else:
                        seen.tool(event)
        except ChatChainError as exc:
            return _failed(exc, "".join(pieces), seen.seen)
        return _streamed(stream, "".join(pieces), seen)


class AStream(EntryPoint):
    """``Chatbot.astream``: `Stream` for ``async for``; ``aclose`` to stop early."""

    def run(
        self, text: str, *, session: str = "s", stop_after: int | None = None, events: bool = False
    ) -> Outcome:
        return asyncio.run(self._run(text, session, stop_after))

    async def _run(self, text: str, session: str, stop_after: int | None) -> Outcome:
        stream = self.bot.astream(text, session_id=session)
        seen, pieces = _Events(), []
        try:
            async with stream:
                async for event in stream.events():
                    if isinstance(event, str):
                        pieces.append(event)
                        seen.text(event)
                        if stop_after is not None and len(pieces) >= stop_after:
                            break
                    else:
                        seen.tool(event)
        except ChatChainError as exc:
            return _failed(exc, "".join(pieces), seen.seen)
        return _streamed(stream, "".join(pieces), seen)


def _streamed(stream: Any, text: str, seen: _Events) -> Outcome:
    usage = stream.usage
    return Outcome(
        text=text,
        tokens=_tokens(usage),
        cost=None if usage is None else usage.cost_usd,
        notices=stream.notices,
        events=tuple(seen.seen),
    )


# -- the service -------------------------------------------------------------------------------


def sse(body: str) -> Iterator[tuple[str, str]]:
    """The ``(event, data)`` pairs of a server-sent event stream."""
    for block in body.replace("\r\n", "\n").split("\n\n"):
        event, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].removeprefix(" "))
        if data:
            yield event, "\n".join(data)


class _Service(EntryPoint):
    """A route of ``create_app`` over the bot, called as user ``ann`` (no caps of her own)."""

    path = ""
    statuses: ClassVar[Mapping[str, int]] = {}
    client: TestClient | None = None
    _token = ""

    def open(
        self, fake: FakeChatModel | None = None, *, tools: Sequence[Any] = (), **values: Any
    ) -> Chatbot:
        self._close_client()
        bot = super().open(fake, tools=tools, **values)
        users = Users(self.store)
        if users.get(USER) is None:
            self._token = users.add(USER)
        self.client = TestClient(create_app(bot, users=users), raise_server_exceptions=False)
        self.client.__enter__()
        self.client.headers["Authorization"] = f"Bearer {self._token}"
        return bot

    def store_id(self, session: str) -> str:
        return f"{USER}:{session}"

    def status_for(self, error_kind: str) -> int | None:
        return self.statuses[error_kind]

    def run(
        self, text: str, *, session: str = "s", stop_after: int | None = None, events: bool = False
    ) -> Outcome:
        headers, body = self.request(text, session)
        headers["Authorization"] = f"Bearer {self._token}"
        if stop_after is not None:
            client = self.client
            answer = leave_after(
                client.app, self.path, headers, body, stop_after, self.pieces, client.app_state
            )
            return self.read(200, answer)
        response = self.client.post(self.path, json=body, headers=headers)
        if response.status_code != 200:
            return self.refused(response.status_code, response.json())
        return self.read(200, response.text)

    def request(self, text: str, session: str) -> tuple[dict[str, str], dict[str, Any]]:
        raise NotImplementedError

    def pieces(self, answer: str) -> int:
        """How many pieces of text the client has read of ``answer`` so far."""
        raise NotImplementedError

    def read(self, status: int, answer: str) -> Outcome:
        raise NotImplementedError

    def refused(self, status: int, body: dict[str, Any]) -> Outcome:
        raise NotImplementedError

    def _close_client(self) -> None:
        client = self.client
        if client is not None:
            client.__exit__(None, None, None)
            self.client = None

    def close(self) -> None:
        self._close_client()
        super().close()


class NativeSSE(_Service):
    """``POST /v1/sessions/{id}/messages`` with ``Accept: text/event-stream``."""

    statuses: ClassVar[Mapping[str, int]] = {
        "BudgetExceeded": 402,
        "ServerError": 502,
        "TurnDeadlineError": 504,
        "ContextTooLongError": 502,
    }

    def request(self, text: str, session: str) -> tuple[dict[str, str], dict[str, Any]]:
        self.path = f"/v1/sessions/{session}/messages"
        return {"Accept": "text/event-stream"}, {"text": text}

    def pieces(self, answer: str) -> int:
        return sum(event == "text" for event, _ in sse(answer))

    def read(self, status: int, answer: str) -> Outcome:
        seen, text = _Events(), []
        usage: dict[str, Any] | None = None
        notices: tuple[str, ...] = ()
        for event, raw in sse(answer):
            data = json.loads(raw)
            if event == "text":
                text.append(data["text"])
                seen.text(data["text"])
            elif event == "tool":
                seen.seen.append(f"{data['phase']}:{data['name']}")
            elif event == "usage":
                usage = data
            elif event == "done":
                notices = tuple(data["notices"])
            elif event == "error":
                return Outcome(
                    text="".join(text),
                    error_kind=data["type"],
                    error_message=data["message"],
                    status=status,
                    events=tuple(seen.seen),
                )
        return Outcome(
            text="".join(text),
            tokens=_json_tokens(usage),
            cost=None if usage is None else usage["cost_usd"],
            notices=notices,
            status=status,
            events=tuple(seen.seen),
        )

    def refused(self, status: int, body: dict[str, Any]) -> Outcome:
        error = body["error"]
        return Outcome(
            error_kind=error["type"], error_message=error["message"], status=status, notices=None
        )


# OpenAI's error codes that stand for a chatchain error class (chatchain.server._errors).
_OPENAI_CODES = {
    "insufficient_quota": "BudgetExceeded",
    "context_length_exceeded": "ContextTooLongError",
}


class OpenAIRoute(_Service):
    """``POST /v1/chat/completions`` streamed, with ``X-Session-Id`` (the server keeps the
    memory) and ``stream_options.include_usage`` (so the reply reports its usage)."""

    path = "/v1/chat/completions"
    statuses: ClassVar[Mapping[str, int]] = {
        "BudgetExceeded": 429,
        "ServerError": 502,
        "TurnDeadlineError": 504,
        "ContextTooLongError": 400,
    }

    def run(
        self, text: str, *, session: str = "s", stop_after: int | None = None, events: bool = False
    ) -> Outcome:
        if events:
            pytest.skip(
                "the OpenAI route runs the server's tools inside the turn and sends the final "
                "text only: it has no tool events"
            )
        return super().run(text, session=session, stop_after=stop_after)

    def request(self, text: str, session: str) -> tuple[dict[str, str], dict[str, Any]]:
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": text}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return {"X-Session-Id": session}, body

    def _chunks(self, answer: str) -> Iterator[dict[str, Any]]:
        for _, raw in sse(answer):
            if raw != "[DONE]":
                yield json.loads(raw)

    def pieces(self, answer: str) -> int:
        return sum(
            1
            for chunk in self._chunks(answer)
            if any(choice["delta"].get("content") for choice in chunk.get("choices", ()))
        )

    def read(self, status: int, answer: str) -> Outcome:
        seen, text = _Events(), []
        usage: dict[str, Any] | None = None
        for chunk in self._chunks(answer):
            if "error" in chunk:
                error = chunk["error"]
                return Outcome(
                    text="".join(text),
                    error_kind=_OPENAI_CODES.get(error["code"], error["code"]),
                    error_message=error["message"],
                    status=status,
                    notices=None,
                    events=tuple(seen.seen),
                )
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") or ""
                text.append(piece)
                seen.text(piece)
            usage = chunk.get("usage") or usage
        return Outcome(
            text="".join(text),
            tokens=_json_tokens(usage),
            cost=None if usage is None else usage["cost_usd"],
            notices=None,  # the route has no field for them
            status=status,
            events=tuple(seen.seen),
        )

    def refused(self, status: int, body: dict[str, Any]) -> Outcome:
        error = body["error"]
        return Outcome(
            error_kind=_OPENAI_CODES.get(error["code"], error["code"]),
            error_message=error["message"],
            status=status,
            notices=None,
        )


class _WholeAnswer:
    """A JSON answer: it comes whole, so a client cannot stop it midway, and it lists no
    tool events in their order (the native one lists the calls, after the fact)."""

    name: str

    def _can(self, stop_after: int | None, events: bool) -> None:
        if stop_after is not None:
            pytest.skip(f"{self.name} answers with the whole reply: no stream to stop")
        if events:
            pytest.skip(f"{self.name} answers once, after the tools ran: no tool events")


class NativeJSON(_WholeAnswer, NativeSSE):
    """``POST /v1/sessions/{id}/messages`` answered as JSON."""

    def run(
        self, text: str, *, session: str = "s", stop_after: int | None = None, events: bool = False
    ) -> Outcome:
        self._can(stop_after, events)
        return super().run(text, session=session)

    def request(self, text: str, session: str) -> tuple[dict[str, str], dict[str, Any]]:
        self.path = f"/v1/sessions/{session}/messages"
        return {}, {"text": text}

    def read(self, status: int, answer: str) -> Outcome:
        reply = json.loads(answer)
        return Outcome(
            text=reply["text"],
            tokens=_json_tokens(reply["usage"]),
            cost=reply["usage"]["cost_usd"],
            notices=tuple(reply["notices"]),
            status=status,
        )


class OpenAIJSON(_WholeAnswer, OpenAIRoute):
    """``POST /v1/chat/completions`` without streaming, with ``X-Session-Id``."""

    def run(
        self, text: str, *, session: str = "s", stop_after: int | None = None, events: bool = False
    ) -> Outcome:
        self._can(stop_after, events)
        return _Service.run(self, text, session=session)

    def request(self, text: str, session: str) -> tuple[dict[str, str], dict[str, Any]]:
        headers, body = super().request(text, session)
        return headers, {**body, "stream": False, "stream_options": None}

    def read(self, status: int, answer: str) -> Outcome:
        completion = json.loads(answer)
        (choice,) = completion["choices"]
        return Outcome(
            text=choice["message"]["content"],
            tokens=_json_tokens(completion["usage"]),
            cost=completion["usage"]["cost_usd"],
            notices=None,  # the route has no field for them
            status=status,
        )


def _json_tokens(usage: dict[str, Any] | None) -> Tokens | None:
    if usage is None:
        return None
    return (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])


def leave_after(
    app: ASGIApp,
    path: str,
    headers: dict[str, str],
    body: dict[str, Any],
    pieces: int,
    count: Callable[[str], int],
    state: dict[str, Any],
) -> str:
    """POST ``body`` to ``app`` and leave once ``count`` says ``pieces`` were read; what the
    client had read by then.

    The client leaves as a browser or an SDK does when it closes the connection: the ASGI
    server's ``receive`` answers ``http.disconnect``. Nothing more is read after it.
    """

    async def request() -> str:
        raw = json.dumps(body).encode()
        left = asyncio.Event()
        received: list[bytes] = []
        messages: list[Message] = [{"type": "http.request", "body": raw, "more_body": False}]

        async def receive() -> Message:
            if messages:
                return messages.pop(0)
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body" and not left.is_set():
                received.append(message.get("body", b""))
                if count(b"".join(received).decode()) >= pieces:
                    left.set()

        all_headers = {**headers, "content-type": "application/json"}
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in all_headers.items()],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": dict(state),  # what the app's lifespan gave (TestClient ran it)
        }
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
        return b"".join(received).decode()

    return asyncio.run(request())


ENTRY_POINTS: dict[str, type[EntryPoint]] = {
    "chat": Chat,
    "stream": Stream,
    "achat": AChat,
    "astream": AStream,
    "native-sse": NativeSSE,
    "openai": OpenAIRoute,
    "native-json": NativeJSON,
    "openai-json": OpenAIJSON,
}
"""Every way a turn is run, by name: the Chatbot's four, and the service's two routes, each
streamed and as JSON."""


def make_entry_point(name: str, folder: Path) -> EntryPoint:
    return ENTRY_POINTS[name](name, folder)
