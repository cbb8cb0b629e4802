"""Reading and checking a session export before anything stored changes.

An import is validated whole, here, with no store in sight: `validate_export` returns a
`SessionExport` that every store can write in one step (`HistoryStore.replace_session`), or
raises one `InvalidInputError` naming the first thing wrong with the file. A file that passes
can be stored by any backend: no lone surrogate (which no driver can encode), no NUL, no
nesting deeper than `MAX_EXPORT_DEPTH`, roles chatchain writes, tool results that answer a
call an AI message made before them, a summary that covers some of the messages, times that
are times.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage, messages_from_dict

from chatchain._turn import validate_session_id
from chatchain.errors import InvalidInputError
from chatchain.stores._base import EXPORT_FORMAT, Summary, utcnow

__all__ = [
    "MAX_EXPORT_BYTES",
    "MAX_EXPORT_DEPTH",
    "SessionExport",
    "parse_export",
    "read_export",
    "validate_export",
]

MAX_EXPORT_BYTES = 256 * 1024 * 1024
"""The largest export file `read_export` reads (256 MiB: some 100,000 long messages)."""

MAX_EXPORT_DEPTH = 100
"""How deeply an export's JSON may nest. Exports of chatchain sessions nest about 10 deep
(tool-call arguments add their own); a deeper file is hostile, and would exhaust Python's
recursion when stored."""

ROLES = frozenset({"human", "ai", "system", "tool"})
"""The message types chatchain stores (``type`` of `langchain_core.messages.message_to_dict`)."""

# Times up to this far ahead of our clock are the exporting machine's clock skew; further is
# not a time the session was written, and would keep it from `prune` for as long.
_SKEW = timedelta(minutes=5)

_FIX = "Fix the file, or export the session again."


@dataclass(frozen=True)
class SessionExport:
    """A session export that passed `validate_export`: any store can keep it as it is.

    Attributes:
        session_id: The id to store it under (the one asked for, else the export's).
        messages: The transcript, oldest first (at least one message).
        summary: The running summary, if the export has one.
        created_at: When the session was created, if the export says (UTC).
        updated_at: When it was last written, if the export says (UTC).
    """

    session_id: str
    messages: list[BaseMessage]
    summary: Summary | None
    created_at: datetime | None
    updated_at: datetime | None


def read_export(path: str | os.PathLike[str]) -> Any:
    """The JSON of the export file at ``path`` (not yet validated: see `validate_export`).

    Raises:
        InvalidInputError: The file cannot be read, is larger than `MAX_EXPORT_BYTES`, or
            is not UTF-8 JSON of sane depth.
    """
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_EXPORT_BYTES + 1)
    except OSError as exc:
        raise InvalidInputError(
            f"Could not read the session export {os.fspath(path)}: {exc.strerror or exc}. "
            "Check the path."
        ) from None
    if len(data) > MAX_EXPORT_BYTES:
        raise InvalidInputError(
            f"The session export {os.fspath(path)} is larger than {MAX_EXPORT_BYTES:,} bytes, "
            "more than a session export holds: check that it is the file you meant."
        )
    return parse_export(data)


def parse_export(text: str | bytes) -> Any:
    """The JSON of an export's text (not yet validated: see `validate_export`).

    Raises:
        InvalidInputError: Not UTF-8, not JSON (``NaN`` and ``Infinity`` are not), or
            nested too deeply for Python to read.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(
                f"The session export is not valid UTF-8 (byte {exc.start}). {_FIX}"
            ) from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidInputError(
            f"The session export nests deeper than the {MAX_EXPORT_DEPTH} levels a session "
            f"export can. {_FIX}"
        ) from None
    except ValueError as exc:
        raise InvalidInputError(f"The session export is not JSON: {exc}. {_FIX}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def validate_export(data: object, *, session_id: str | None = None) -> SessionExport:
    """Check a whole export (as `HistoryStore.export_session` made it) before storing it.

    Args:
        data: The export: a mapping, as `parse_export` returns it.
        session_id: Store it under this id instead of the export's.

    Raises:
        InvalidInputError: The first thing wrong with the export, and where.

    Example:
        >>> export = {"format": "chatchain.session/1", "session_id": "s",
        ...           "messages": [{"type": "ai", "data": {"content": "hi"}}]}
        >>> validate_export(export)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        chatchain.errors.InvalidInputError: The session export's history starts with an AI ...
    """
    if isinstance(data, Mapping):
        data = dict(data)
    if not isinstance(data, dict):
        raise InvalidInputError(
            f"The session export is {_kind(data)}, not a JSON object: this is not a chatchain "
            f"session export (format {EXPORT_FORMAT!r}). {_FIX}"
        )
    _check_format(data.get("format"))
    _check_json(data)
    target = _target(data.get("session_id"), session_id)
    messages = _messages(data.get("messages"))
    summary = _summary(data.get("summary"), len(messages))
    created = _time(data.get("created_at"), "created_at")
    updated = _time(data.get("updated_at"), "updated_at")
    if created is not None and updated is not None and created > updated:
        raise InvalidInputError(
            f"The session export says it was created ({created.isoformat()}) after it was "
            f"last written ({updated.isoformat()}). {_FIX}"
        )
    return SessionExport(target, messages, summary, created, updated)


def _kind(value: object) -> str:
    kinds = {list: "a JSON list", str: "a JSON string", type(None): "null", bool: "a boolean"}
    return kinds.get(type(value), "a number" if isinstance(value, (int, float)) else "not JSON")


def _check_format(name: object) -> None:
    if name == EXPORT_FORMAT:
        return
    if isinstance(name, str) and name.startswith("chatchain.session/"):
        raise InvalidInputError(
            f"The session export is in format {name!r}; this chatchain reads "
            f"{EXPORT_FORMAT!r}: import it with the chatchain version that exported it, or "
            "upgrade chatchain."
        )
    raise InvalidInputError(
        f"This is not a chatchain session export (expected format {EXPORT_FORMAT!r}): "
        "export the session with chatchain first."
    )


def _check_json(data: dict[str, Any]) -> None:
    """Every value is JSON, nests at most `MAX_EXPORT_DEPTH` deep, and every string (keys
    too) can be stored anywhere: valid Unicode, without NUL."""
    stack: list[tuple[object, int, tuple[str | int, ...]]] = [(data, 1, ())]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            _check_string(value, where)
        elif isinstance(value, (dict, list, tuple)):
            if depth > MAX_EXPORT_DEPTH:
                raise InvalidInputError(
                    f"The session export nests deeper than {MAX_EXPORT_DEPTH} levels (at "
                    f"{_where(where)}), deeper than a session export can. {_FIX}"
                )
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise InvalidInputError(
                            f"The session export has a key that is not text ({key!r}) at "
                            f"{_where(where)}. {_FIX}"
                        )
                    _check_string(key, (*where, key))
                    stack.append((item, depth + 1, (*where, key)))
            else:
                stack.extend((item, depth + 1, (*where, i)) for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(
                f"The session export holds {value} at {_where(where)}, which is not a JSON "
                f"number. {_FIX}"
            )
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise InvalidInputError(
                f"The session export holds a {type(value).__name__} at {_where(where)}, which "
                f"is not JSON. {_FIX}"
            )


def _check_string(text: str, where: tuple[str | int, ...]) -> None:
    if "\x00" in text:
        raise InvalidInputError(
            f"The session export holds a NUL character (\\x00) at {_where(where)}, which "
            f"stores cannot keep. {_FIX}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"The session export holds a lone surrogate (U+{ord(text[exc.start]):04X}) at "
            f"{_where(where)}, which is not valid Unicode and cannot be stored. {_FIX}"
        ) from None


def _where(path: tuple[str | int, ...]) -> str:
    """A JSON path for messages: ``messages[3].data.content``."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out or "the top level"


def _target(exported: object, asked: str | None) -> str:
    if asked is not None:
        return validate_session_id(asked)
    if exported is None:
        raise InvalidInputError(
            "The session export names no session id: choose the id to import it under "
            "(session_id=..., or --as ID on the command line)."
        )
    try:
        return validate_session_id(exported)
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"The session export's session id cannot be used ({exc}): choose another id to "
            "import it under (session_id=..., or --as ID on the command line)."
        ) from None


def _messages(value: object) -> list[BaseMessage]:
    if not isinstance(value, list) or not value:
        raise InvalidInputError(
            "The session export holds no messages (an export has a non-empty list "
            f"'messages'). {_FIX}"
        )
    messages = []
    for number, item in enumerate(value, 1):
        role = item.get("type") if isinstance(item, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            shown = "no role" if role is None else f"the role {role!r}"
            raise InvalidInputError(
                f"Message {number} of the session export has {shown}; chatchain stores "
                f"{', '.join(sorted(ROLES))}. {_FIX}"
            )
        try:
            messages.append(messages_from_dict([item])[0])
        except Exception as exc:  # LangChain's validators raise whatever bad data trips
            reason = "; ".join(str(exc).splitlines()[:3]) or type(exc).__name__
            raise InvalidInputError(
                f"Message {number} of the session export cannot be read ({reason}). {_FIX}"
            ) from None
    first = next((i for i, m in enumerate(messages) if m.type != "system"), None)
    if first is not None and messages[first].type != "human":
        raise InvalidInputError(
            f"The session export's history starts with "
            f"{'an AI' if messages[first].type == 'ai' else 'a tool'} message (message "
            f"{first + 1}): a conversation starts with the user (after any system message). "
            f"{_FIX}"
        )
    _check_tool_results(messages)
    return messages


def _check_tool_results(messages: list[BaseMessage]) -> None:
    """Every tool result answers a call that an AI message before it made."""
    calls: set[str] = set()
    for number, message in enumerate(messages, 1):
        if isinstance(message, AIMessage):
            calls.update(str(call.get("id")) for call in message.tool_calls)
        elif isinstance(message, ToolMessage) and message.tool_call_id not in calls:
            raise InvalidInputError(
                f"Message {number} of the session export is the result of tool call "
                f"{message.tool_call_id!r}, which no AI message before it made (a tool "
                f"result answers a call in an earlier message's tool_calls). {_FIX}"
            )


def _summary(value: object, count: int) -> Summary | None:
    if value is None:
        return None
    text = value.get("text") if isinstance(value, dict) else None
    covers = value.get("covers") if isinstance(value, dict) else None
    if not isinstance(text, str):
        raise InvalidInputError(
            f"The session export's summary has no text (expected {{'text': ..., 'covers': "
            f"...}} or null). {_FIX}"
        )
    # bool is an int to Python, never a count to JSON.
    if isinstance(covers, bool) or not isinstance(covers, int) or not 0 <= covers <= count:
        raise InvalidInputError(
            f"The session export's summary covers {covers!r} messages; it can cover 0 to "
            f"the {count} the export holds. {_FIX}"
        )
    return Summary(text, covers)


def _time(value: object, name: str) -> datetime | None:
    """A time of the export, in UTC (naive means UTC, as `utcnow` gives); ``None`` if absent."""
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise TypeError
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(
            f"The session export's {name} {value!r} is not an ISO 8601 time such as "
            f"'2025-01-31T12:00:00+00:00'. {_FIX}"
        ) from None
    if moment > utcnow() + _SKEW:
        raise InvalidInputError(
            f"The session export's {name} ({moment.isoformat()}) is in the future. {_FIX}"
        )
    return moment
