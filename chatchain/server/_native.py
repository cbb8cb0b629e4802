"""The native API: a user's sessions, their turns (JSON or server-sent events) and usage.

Every route takes the caller from the bearer token and only ever sees the caller's sessions:
the store keys them ``"name:session_id"`` and the API shows the ``session_id`` part. Another
user's session id is simply absent, so it answers 404 like one that never existed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from chatchain import (
    AsyncReplyStream,
    ChatChainError,
    InvalidInputError,
    Reply,
    ToolFinished,
    ToolStarted,
    format_usd,
)
from chatchain.pricing import Pricer
from chatchain.server import _metrics
from chatchain.server._errors import HTTPProblem, error_body, status_of
from chatchain.server._schemas import (
    BudgetLeftOut,
    LimitsOut,
    MeOut,
    MessageIn,
    MessageOut,
    Messages,
    ReplyOut,
    SessionOut,
    Sessions,
    TitleIn,
    ToolRequestOut,
    UsageOut,
    UsageReportOut,
    tool_call_out,
    usage_out,
)
from chatchain.server._service import (
    Caller,
    Service,
    ServiceDep,
    own_id,
    session_key,
    session_key_prefix,
)
from chatchain.server._streaming import Piece, relay, texts_joined
from chatchain.stores import HistoryStore, Summary, TitleBackend
from chatchain.usage import Usage
from chatchain.users import User

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["sessions"])

# The operator's side of a failed turn: the page shows its user words for people, and the
# server's log keeps what went wrong (the settings to change, the endpoint's answer).
_log = logging.getLogger("uvicorn.error")  # the server's log, as uvicorn configures it

ROUTE = "native"  # the `route` label of this API's turns in the metrics

MAX_LISTED = 500  # GET /v1/sessions lists a user's newest sessions, at most this many

# Keyword arguments of Chatbot.achat/astream: a prompt variable of that name would clash.
_RESERVED_VARS = frozenset({"text", "input", "session_id", "user_id", "limits"})

_ROLES = {
    "human": "user",
    "ai": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
}

_EVENTS = {
    200: {
        "description": "The reply as JSON; with `Accept: text/event-stream`, server-sent "
        "events: `text` {text} ... (the pieces that arrive together in one event), then "
        "`usage` (as the JSON's usage), then `done` "
        "{interrupted, notices}; a failure after the first text (or tool) event is an "
        "`error` event {type, message, status} that ends the stream. With the server's "
        "tools (`chatchain serve --tools MODULE`), each call is a `tool` event {phase: "
        "started, id, name, args} and later {phase: finished, ...the call as in the JSON's "
        "tool_calls}, in order among the text events.",
        "content": {"text/event-stream": {}},
    }
}


def _not_found(session_id: str) -> HTTPProblem:
    return HTTPProblem(404, f"There is no session {session_id!r}: see GET /v1/sessions for yours.")


def _turn_args(service: Service, user: User, session_id: str, body: MessageIn) -> dict[str, Any]:
    reserved = sorted(set(body.vars) & _RESERVED_VARS)
    if reserved:
        raise InvalidInputError(
            f"The prompt variable(s) {', '.join(reserved)} cannot be set through vars: "
            "rename the variable in the system prompt."
        )
    return {
        "session_id": session_key(user, session_id),
        "user_id": user.name,
        "limits": service.users.limits(user),
        **body.vars,
    }


def _reply_out(session_id: str, reply: Reply) -> ReplyOut:
    return ReplyOut(
        session_id=session_id,
        text=reply.text,
        interrupted=reply.interrupted,
        notices=list(reply.notices),
        usage=usage_out(reply.usage),
        tool_calls=[tool_call_out(run) for run in reply.tool_runs],
    )


def _wants_events(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


@router.post(
    "/sessions/{session_id}/messages",
    response_model=ReplyOut,
    responses=_EVENTS,  # type: ignore[arg-type]
)
async def post_message(
    session_id: str, body: MessageIn, request: Request, user: Caller, service: ServiceDep
) -> Any:
    """Send one message in one of your sessions (created by its first message)."""
    _metrics.serving(ROUTE)
    args = _turn_args(service, user, session_id, body)
    replaced = await _replace_last(service, user, session_id) if body.replace_last else None
    try:
        if _wants_events(request):
            return await _stream(request, service, user, body.text, args)
        try:
            reply = await service.bot.achat(body.text, **args)
        except ChatChainError as exc:
            _log_failure(user, exc)
            raise
    except Exception:
        if replaced is not None:  # refused before anything was stored: the last turn is back
            await asyncio.to_thread(replaced.put_back, service.bot.store)
        raise
    return _reply_out(session_id, reply)


class _Replaced:
    """A session whose last turn was taken out of its history, to put back if need be."""

    def __init__(
        self,
        key: str,
        before: list[BaseMessage],
        summary: Summary | None,
        kept: int,
        created: datetime | None,
    ) -> None:
        self.key = key
        self.before = before
        self.summary = summary
        self.kept = kept
        self.created = created

    @classmethod
    def take(cls, store: HistoryStore, key: str) -> _Replaced | None:
        """Under the session's lock, drop its last user message and all after it from the
        history (the ledger keeps what they cost); ``None`` if it has no user message."""
        with store.lock(key):
            before = store.load(key)
            users = [i for i, message in enumerate(before) if message.type == "human"]
            if not users:
                return None
            info = store.info(key)
            summary = store.get_summary(key)
            kept = before[: users[-1]]
            # A summary never covers the newest turn; this one keeps it only if it still fits.
            keep_summary = summary if summary is None or summary.covers <= len(kept) else None
            created = info.created_at if info is not None else None
            store.replace_session(key, kept, keep_summary, created_at=created)
        return cls(key, before, summary, len(kept), created)

    def put_back(self, store: HistoryStore) -> None:
        """The history as it was, if nothing was written to the session since."""
        with store.lock(self.key):
            if store.count(self.key) == self.kept:
                store.replace_session(self.key, self.before, self.summary, created_at=self.created)


async def _replace_last(service: Service, user: User, session_id: str) -> _Replaced:
    key = _existing(service, user, session_id)
    replaced = await asyncio.to_thread(_Replaced.take, service.bot.store, key)
    if replaced is None:
        raise InvalidInputError(
            f"Session {session_id!r} has no message to replace: send one without replace_last."
        )
    return replaced


async def _stream(
    request: Request, service: Service, user: User, text: str, args: dict[str, Any]
) -> Response:
    """The reply as server-sent events (see `relay`), tool events included."""
    return await relay(
        request,
        service,
        user,
        lambda: service.bot.astream(text, **args),
        _Events(),
        tools=True,
        on_failure=lambda exc: _log_failure(user, exc),
    )


def _log_failure(user: User, exc: Exception) -> None:
    """Log a failed turn's error for the operator: the endpoint's and the server's failures,
    and refused input (its message names the settings); a refusal of the user's own, such as
    a budget or a busy session, is the user's business and is not logged."""
    if isinstance(exc, ChatChainError) and status_of(exc) < 500 and status_of(exc) != 422:
        return
    _log.warning("A turn of user %s failed: %s: %s", user.name, type(exc).__name__, exc)


def _event(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\r\ndata: {json.dumps(data, ensure_ascii=False)}\r\n\r\n".encode()


class _Events:
    """The native API's events: ``text``, ``tool``, then ``usage`` and ``done``, or ``error``."""

    def start(self) -> bytes:
        return b""

    def pieces(self, pieces: Sequence[Piece]) -> bytes:
        return b"".join(
            _text_event(piece) if isinstance(piece, str) else _tool_event(piece)
            for piece in texts_joined(pieces)
        )

    def end(self, stream: AsyncReplyStream) -> bytes:
        assert stream.usage is not None  # set when the stream ended
        done = {"interrupted": False, "notices": list(stream.notices)}
        return _event("usage", usage_out(stream.usage).model_dump()) + _event("done", done)

    def error(self, kind: str, status: int, message: str) -> bytes:
        return _event("error", {**error_body(kind, message)["error"], "status": status})


def _text_event(text: str) -> bytes:
    # The hot path: one event per batch of pieces, written without a dict.
    data = json.dumps(text, ensure_ascii=False)
    return f'event: text\r\ndata: {{"text": {data}}}\r\n\r\n'.encode()


def _tool_event(event: ToolStarted | ToolFinished) -> bytes:
    if isinstance(event, ToolStarted):
        started = {"id": event.id, "name": event.name, "args": event.args}
        return _event("tool", {"phase": "started", **started})
    return _event("tool", {"phase": "finished", **tool_call_out(event.call).model_dump()})


@router.get("/sessions", response_model=Sessions)
def list_sessions(user: Caller, service: ServiceDep) -> Sessions:
    """Your sessions, the one written most recently first: the newest 500 (`MAX_LISTED`)."""
    # Only the caller's range of store ids is read, not every user's sessions.
    store = service.bot.store
    infos = store.session_infos(session_key_prefix(user), limit=MAX_LISTED)
    given = store.titles([i.session_id for i in infos]) if isinstance(store, TitleBackend) else {}
    return Sessions(
        sessions=[
            SessionOut(
                session_id=own,
                title=given.get(info.session_id) or _first_words(store, info.session_id) or own,
                message_count=info.message_count,
                created_at=info.created_at,
                updated_at=info.updated_at,
            )
            for info in infos
            if (own := own_id(user, info.session_id)) is not None
        ]
    )


TITLE_CHARS = 80  # a title from the first message: its first line, at most this long


def _first_words(store: HistoryStore, session_id: str) -> str:
    """The start of the session's first message: one message read, whatever its length."""
    first = store.load(session_id, 0, 1)
    if not first:
        return ""
    line = " ".join(first[0].text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


@router.put("/sessions/{session_id}/title", status_code=204, response_class=Response)
def set_title(session_id: str, body: TitleIn, user: Caller, service: ServiceDep) -> Response:
    """Rename one of your sessions; an empty title gives it back its first message's."""
    key = _existing(service, user, session_id)
    store = service.bot.store
    if not isinstance(store, TitleBackend):
        raise HTTPProblem(501, "This server's store keeps no titles: sessions keep theirs.")
    store.set_title(key, " ".join(body.title.split()) or None)
    return Response(status_code=204)


def _existing(service: Service, user: User, session_id: str) -> str:
    key = session_key(user, session_id)
    if service.bot.session_info(key) is None:
        raise _not_found(session_id)
    return key


def _call_usage(message: AIMessage, pricer: Pricer) -> Usage | None:
    """One stored model call's usage, from the tokens the endpoint reported with it."""
    tokens = message.usage_metadata
    if not tokens:
        return None
    model = message.response_metadata.get("model_name")
    price = pricer.price(model, tokens["input_tokens"], tokens["output_tokens"])
    return Usage(
        prompt_tokens=tokens["input_tokens"],
        completion_tokens=tokens["output_tokens"],
        total_tokens=tokens["total_tokens"],
        cost_usd=price.cost_usd,
        model=model,
    )


def _stored_usage(calls: list[Usage]) -> UsageOut | None:
    """A stored reply's usage: every model call of its turn (a turn with tools makes several),
    as the stream's usage event gave it; timings are not stored, so its line has none."""
    if not calls:
        return None
    usage = sum(calls[1:], calls[0])
    out = usage_out(usage)
    out.line = (
        f"{usage.total_tokens} tokens ({usage.prompt_tokens} prompt + "
        f"{usage.completion_tokens} completion), {usage.cost_text}"
    )
    return out


def _messages_out(history: list[BaseMessage], pricer: Pricer) -> list[MessageOut]:
    """The transcript, each reply with the usage of its turn's calls up to it."""
    out: list[MessageOut] = []
    calls: list[Usage] = []
    for message in history:
        shown = _message_out(message)
        if message.type == "human":
            calls = []
        elif isinstance(message, AIMessage):
            call = _call_usage(message, pricer)
            calls += [call] if call is not None else []
            if message.text:
                shown.usage = _stored_usage(calls)
                calls = []
        out.append(shown)
    return out


def _message_out(message: BaseMessage) -> MessageOut:
    out = MessageOut(
        role=_ROLES.get(message.type, "system"),  # type: ignore[arg-type]
        text=message.text,
        interrupted=bool(message.response_metadata.get("interrupted")),
    )
    if isinstance(message, AIMessage) and message.tool_calls:
        out.tool_calls = [
            ToolRequestOut(id=call["id"] or "", name=call["name"], args=call["args"])
            for call in message.tool_calls
        ]
    elif isinstance(message, ToolMessage):
        out.name, out.tool_call_id, out.status = message.name, message.tool_call_id, message.status
    return out


@router.get(
    "/sessions/{session_id}/messages", response_model=Messages, response_model_exclude_none=True
)
def get_messages(session_id: str, user: Caller, service: ServiceDep) -> Messages:
    """The whole transcript of one of your sessions, oldest first."""
    key = _existing(service, user, session_id)
    history = service.bot.history(key)
    pricer = service.bot.settings.pricer()
    return Messages(session_id=session_id, messages=_messages_out(history, pricer))


@router.delete("/sessions/{session_id}", status_code=204, response_class=Response)
def delete_session(session_id: str, user: Caller, service: ServiceDep) -> Response:
    """Delete one of your sessions (its usage stays in the ledger)."""
    key = _existing(service, user, session_id)
    service.bot.delete(key)  # its title too: a later session of that id starts afresh
    return Response(status_code=204)


@router.get("/sessions/{session_id}/export")
def export_session(session_id: str, user: Caller, service: ServiceDep) -> dict[str, Any]:
    """One of your sessions as chatchain's export JSON (``chatchain sessions import`` reads it)."""
    data = service.bot.export_session(_existing(service, user, session_id))
    return {**data, "session_id": session_id}


@router.get("/usage", response_model=UsageReportOut)
def usage(user: Caller, service: ServiceDep) -> UsageReportOut:
    """Your usage: the total and rows by session, model and day."""
    report = service.bot.usage_report(by=("session", "model", "day"), user_id=user.name)
    rows = [{**row, "session": own_id(user, row["session"]) or "-"} for row in report.rows]
    return UsageReportOut(total=usage_out(report.total), rows=rows)


@router.get("/me", response_model=MeOut)
def me(user: Caller, service: ServiceDep) -> MeOut:
    """Who you are, the model that answers, what is left of your tightest USD cap, and your
    rate limits."""
    limits = LimitsOut(
        requests_per_minute=service.throttle.request_limit(user).amount,
        streams=service.throttle.stream_limit(user).amount,
    )
    return MeOut(
        user=user.name,
        model=service.bot.settings.model,
        budget=_budget_left(service, user),
        limits=limits,
    )


def _budget_left(service: Service, user: User) -> BudgetLeftOut | None:
    tightest: BudgetLeftOut | None = None
    for limit in service.users.limits(user):
        if limit.max_usd is None:
            continue
        entries = service.bot.store.usage_entries(user_id=user.name, since=limit.since)
        spent = sum(entry.cost_usd or 0.0 for entry in entries)
        left = max(0.0, limit.max_usd - spent)
        if tightest is None or left < tightest.left_usd:
            cap = (limit.label or "budget").rsplit("'s ", 1)[-1]
            # What is left in whole cents, rounded down (never more than is there); what
            # was spent with the precision it needs.
            cents = format_usd(math.floor(left * 100) / 100)
            line = (
                f"{cents} left of your {cap} of {format_usd(limit.max_usd)} "
                f"({format_usd(limit.max_usd - left)} spent)"
            )
            tightest = BudgetLeftOut(cap=cap, max_usd=limit.max_usd, left_usd=left, line=line)
    return tightest
