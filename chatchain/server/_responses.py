"""OpenAI's Responses API over chatchain's sessions: ``POST /v1/responses``, ``GET`` and
``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``.

Clients of the Responses API (the ``openai`` SDK's ``client.responses``, the OpenAI Agents
SDK's default model) use chatchain with a chatchain bearer token as their API key. Each
request is authenticated, rate-limited, metered and capped like a turn of the native API,
and errors have OpenAI's shape (see `chatchain.server._errors.openai_error`).

**Conversations are sessions.** A response belongs to one session of the caller (session
ids ``resp-<32 hex digits>``, listed by ``GET /v1/sessions`` like any other):

- Without ``previous_response_id`` a request starts a new conversation, a new session. Its
  ``input``'s last user message is the turn; the items before it (earlier user and
  assistant messages, function calls and their outputs) are stored first as the session's
  history, so a client that sends its whole conversation gets it kept.
- With ``previous_response_id`` naming the session's **newest** response, the request is
  the session's next turn: its window, running summary, caps, usage ledger and one writer
  per session apply, exactly as for a native turn. Its ``input`` is only the new turn: a
  user message (a string, or one or more user messages, joined) or the
  ``function_call_output`` items that answer the previous response's function calls.
- With ``previous_response_id`` naming an **older** response of the session, the request
  forks: a new session is made holding the history up to (and with) that response, its
  summary kept if it covers no more than that, and the turn runs there. The old session
  is unchanged; the new response belongs to the new session.
- Another user's response id, an id this server did not make, an id of a deleted
  conversation and one of a ``store: false`` response are all 404, alike.

**Response ids** name where the response is, within the caller's own sessions:
``resp_<conversation>_<start>_<created>`` is the session ``resp-<conversation>`` of the
caller, the index of the response's first message in it (its input), and its creation
time. Nothing else is stored: the session's messages are the response (its input, its
output, the usage its calls reported), so no table is needed and every store serves it. An
id is looked up only among the caller's sessions, so another user's id finds nothing.

**store.** ``"store": false`` keeps nothing: the request is sent as a stateless call (the
deployment's system prompt, the previous response's history if one is named, the input)
and metered in the ledger under the caller like any call; its id names no session, so
retrieving or continuing it is 404.

**instructions** (and system or developer messages in ``input``) are accepted, echoed back
in the response's ``instructions``, and **not sent**: the deployment's system prompt is the
system prompt, and the client's is not the client's to replace (as with ``X-Session-Id`` on
``/v1/chat/completions``). Say what the model should do in the user message instead.

**DELETE** deletes the whole conversation the response belongs to: its session (messages,
summary). Every response of that session is then 404, and continuing from any of them is
404; a fork made from it earlier is a session of its own and stays. What it spent stays in
the usage ledger, as for any deleted session.

**X-Session-Id and previous_response_id.** This route never reads ``X-Session-Id``: the
response id is its way to name a conversation. ``X-Session-Id`` belongs to
``/v1/chat/completions``, where it names a session whose stored history is the
conversation, and where the request's messages other than the last user message are
ignored, so a client that sends the header *and* its whole history on every turn gets its
last message run on the stored session (its history is not appended twice). A session
started here can be continued there by its id (``X-Session-Id: resp-<conversation>``), and
the other way round is not possible (a chat-completions session has no response ids). A
client that resends its whole history here on every turn, without
``previous_response_id``, starts a new session each time: send ``previous_response_id``
to have the server keep the conversation, or ``"store": false`` to keep nothing.

**Streaming** (``"stream": true``) sends OpenAI's semantic events, each with a
``sequence_number``: ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` (the pieces ready together, joined), then
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done`` and ``response.completed`` with the usage. A turn refused
before its first piece answers with its HTTP status; a failure after it is an ``error``
event (the SDK raises ``openai.APIError``).

**Tools and structured output.** Function ``tools``, ``tool_choice`` and
``parallel_tool_calls`` are sent to the model (`chatchain.ModelOptions`) and never run here:
the model's calls come back as ``function_call`` output items (streamed as
``response.output_item.added`` and ``response.function_call_arguments.delta``), the turn is
stored with them, and the client's ``function_call_output`` items, with
``previous_response_id``, are the session's next turn (the whole exchange stays in one
session, and the window keeps the calls with their results). ``text.format``
``json_schema`` (the reply checked against the schema) and ``json_object`` are sent as the
call's response format. A deployment with tools of its own (``serve --tools``) refuses
function tools (400): the model's calls could not be told apart from the server's.

**Limits.** A request continuing the newest response while a turn is under way on its
session (another request continuing it, already sending) forks, as from an older response.
Two that come within the same few milliseconds may both find the response the newest:
the session's lock runs them one after the other, the later one continuing after the
earlier one instead of beside it, and its id names where it was stored. A streamed
response's id is sent before its turn runs, so in that narrow race it names the place it
was given (the earlier one's). ``max_output_tokens`` lowers the cap on the reply, never
raises it, as ``max_tokens`` on ``/v1/chat/completions``: the reply takes at most the
smallest of it, the deployment's cap and what the budget can pay for, and one cut there is
``"incomplete"`` with ``incomplete_details.reason`` ``"max_output_tokens"``. Sampling fields
(``temperature``, ``top_p``) are accepted and the deployment's settings decide them.
Hosted tools (web search, files, ...), ``background``, ``conversation``, ``prompt`` and
non-text input are refused with 400.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from uuid import uuid4

import anyio
from fastapi import APIRouter, Query, Request
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from pydantic import BaseModel, ConfigDict, Field

from chatchain import AsyncReplyStream, ModelOptions, Reply, ToolCallDelta, Usage
from chatchain.server import _metrics
from chatchain.server._errors import HTTPProblem, openai_error
from chatchain.server._service import Caller, Service, ServiceDep, session_key
from chatchain.server._streaming import Piece, relay, texts_joined
from chatchain.stores import Summary
from chatchain.users import User

__all__ = ["ResponseId", "ResponseRequest", "router"]

router = APIRouter(prefix="/v1", tags=["responses"])

ROUTE = "responses"  # the `route` label of these turns in the metrics

SESSION_PREFIX = "resp-"
"""What the session ids of conversations started here begin with."""

RESULT_PREFIX = "fco_"
"""The id of a stored result of a client's function call begins with this."""

_PAGE = 64  # messages read at a time when looking for a response's end

_ID = re.compile(r"resp_([0-9a-f]{32})_([0-9]{1,12})_([0-9]{1,12})")


@dataclass(frozen=True)
class ResponseId:
    """Where a response is among its caller's sessions; its text is the response's id.

    Attributes:
        conversation: The session's 32 hex digits (the session id is ``resp-`` and them).
        start: The index of the response's first message (its input) in the session.
        created: When the response was created (Unix seconds).

    Example:
        >>> rid = ResponseId("0" * 32, 2, 1700000000)
        >>> ResponseId.parse(str(rid)) == rid, rid.session_id[:7]
        (True, 'resp-00')
    """

    conversation: str
    start: int
    created: int

    def __str__(self) -> str:
        return f"resp_{self.conversation}_{self.start}_{self.created}"

    @property
    def session_id(self) -> str:
        """The caller's session id of the conversation."""
        return SESSION_PREFIX + self.conversation

    @classmethod
    def parse(cls, text: str) -> ResponseId | None:
        """The id ``text`` names, or ``None`` when this server makes no such id."""
        match = _ID.fullmatch(text)
        if match is None:
            return None
        return cls(match[1], int(match[2]), int(match[3]))

    @classmethod
    def new(cls, start: int = 0, conversation: str | None = None) -> ResponseId:
        """A response of a new conversation (or of ``conversation``) starting at ``start``."""
        return cls(conversation or uuid4().hex, start, int(time.time()))


# -- the request ---------------------------------------------------------------------------


class TextFormat(BaseModel):
    """``text.format``: ``text``, ``json_schema`` (with ``name``, ``schema``, ``strict``) or
    ``json_object``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    type: Literal["text", "json_schema", "json_object"] = "text"
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: TextFormat | None = None
    verbosity: str | None = None


class ResponseRequest(BaseModel):
    """The body of ``POST /v1/responses`` (OpenAI's; unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Required: one of the models GET /v1/models lists.")
    input: str | list[dict[str, Any]]
    instructions: str | None = Field(
        default=None, description="Echoed back, not sent: the deployment's system prompt stays."
    )
    previous_response_id: str | None = None
    store: bool | None = True
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None  # lowers the deployment's cap (see `_options`)
    # Accepted and ignored: the deployment's settings decide these.
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    truncation: str | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    context_management: Any = None
    max_tool_calls: int | None = None
    # Refused unless left out (see `_refuse_unsupported`).
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None


def _bad(message: str) -> HTTPProblem:
    return HTTPProblem(400, message, type="InvalidInputError")


def _not_found(text: str) -> HTTPProblem:
    return HTTPProblem(
        404,
        f"No response with id {text!r} is yours here: it may be another user's, deleted, "
        "made with store=false, or not from this server. Start a new conversation without "
        "previous_response_id.",
        type="NotFound",
    )


def _refuse_unsupported(body: ResponseRequest) -> None:
    if body.background:
        raise _bad("background responses are not supported: leave background out.")
    if body.conversation is not None:
        raise _bad(
            "conversation objects are not supported: continue a conversation with "
            "previous_response_id."
        )
    if body.prompt is not None:
        raise _bad("stored prompts are not supported: leave prompt out and send input.")
    for index, tool in enumerate(body.tools or ()):
        if tool.get("type") != "function":
            raise _bad(
                f"tools[{index}]: tools of type {tool.get('type')!r} are not supported; only "
                "function tools, which your code runs."
            )


def _options(body: ResponseRequest) -> ModelOptions | None:
    """The request's tools, tool choice, text format and ``max_output_tokens``, as chat
    completions write them.

    Raises:
        InvalidInputError: A tool or the tool choice is not one the model can be sent, or
            ``max_output_tokens`` is not a positive int.
    """
    tools = tuple(
        {
            "type": "function",
            "function": {
                key: tool[key]
                for key in ("name", "description", "parameters", "strict")
                if tool.get(key) is not None
            },
        }
        for tool in body.tools or ()
    )
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _bad(f"tool_choice {choice!r}: only a function (or auto, none, required).")
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if not tools and choice in ("auto", "none"):
        choice = None  # nothing to choose among: the call is a plain one
    if body.max_output_tokens is not None and body.max_output_tokens < 1:
        raise _bad(f"max_output_tokens must be a positive int, not {body.max_output_tokens}.")
    options = ModelOptions(
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls if tools else None,
        response_format=_response_format(body),
        max_tokens=body.max_output_tokens,
    )
    return options if options or options.max_tokens is not None else None


def _response_format(body: ResponseRequest) -> dict[str, Any] | None:
    """``text.format`` as chat completions' ``response_format``."""
    text_format = body.text.format if body.text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": text_format.name or "reply"}
    spec["schema"] = text_format.json_schema or {}
    if text_format.strict is not None:
        spec["strict"] = text_format.strict
    if text_format.description is not None:
        spec["description"] = text_format.description
    return {"type": "json_schema", "json_schema": spec}


# -- the input -----------------------------------------------------------------------------


@dataclass
class _Input:
    """What a request's ``input`` asks: the turn (the user's text, or the results of the
    client's tools), after some earlier history."""

    turn: str | list[ToolMessage]
    history: list[BaseMessage]
    instructions: list[str]


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content: send a string or a list of text parts.")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
            part.get("text"), str
        ):
            raise _bad(
                f"{where}.content[{index}]: content of type {kind!r} is not supported; only "
                'text parts ({"type": "input_text", "text": "..."}).'
            )
        texts.append(part["text"])
    return "".join(texts)


def _read_input(body: ResponseRequest) -> _Input:
    """The request's input as one turn's text and the history before it.

    Raises:
        HTTPProblem: 400 for an input that is not text or that holds no user message.
    """
    instructions = [body.instructions] if body.instructions else []
    if isinstance(body.input, str):
        return _Input(body.input, [], instructions)
    history: list[BaseMessage] = []
    for index, item in enumerate(body.input):
        where = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            role, text = item.get("role"), _content_text(item.get("content"), where)
            if role == "user":
                history.append(HumanMessage(text))
            elif role == "assistant":
                history.append(AIMessage(text))
            elif role in ("system", "developer"):
                instructions.append(text)
            else:
                raise _bad(f"{where}: unknown role {role!r}.")
        elif kind == "function_call":
            _add_function_call(history, item, where)
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else json.dumps(output)
            call_id = str(item.get("call_id") or "")
            # The id marks a result the client sent: where a response begins.
            history.append(ToolMessage(text, tool_call_id=call_id, id=RESULT_PREFIX + call_id))
        elif kind == "reasoning":
            continue  # another model's reasoning: nothing this one can use
        else:
            raise _bad(
                f"{where}: input items of type {kind!r} are not supported; send messages "
                "with text content."
            )
    results = _trailing_results(history)
    if results:
        return _Input(results, history[: len(history) - len(results)], instructions)
    turn = _trailing_user_text(history)
    if turn is None:
        raise _bad(
            "The input must end with a user message (its text is the turn), or with the "
            "function_call_output items answering the function calls: add one."
        )
    return _Input(turn[0], turn[1], instructions)


def _trailing_results(history: list[BaseMessage]) -> list[ToolMessage]:
    """The tool results that end ``history``."""
    cut = len(history)
    while cut and isinstance(history[cut - 1], ToolMessage):
        cut -= 1
    return [m for m in history[cut:] if isinstance(m, ToolMessage)]


def _add_function_call(history: list[BaseMessage], item: dict[str, Any], where: str) -> None:
    """A function call the model made earlier, on the assistant message it belongs to."""
    try:
        args = json.loads(item.get("arguments") or "{}")
    except json.JSONDecodeError:
        raise _bad(f"{where}.arguments: not JSON.") from None
    call = {"name": str(item.get("name") or ""), "args": args, "id": item.get("call_id")}
    last = history[-1] if history else None
    if isinstance(last, AIMessage):  # the calls of one reply come one item each
        history[-1] = last.model_copy(update={"tool_calls": [*last.tool_calls, call]})
    else:
        history.append(AIMessage("", tool_calls=[call]))


def _trailing_user_text(history: list[BaseMessage]) -> tuple[str, list[BaseMessage]] | None:
    """The text of the user messages that end ``history`` (joined), and what comes before."""
    cut = len(history)
    while cut and isinstance(history[cut - 1], HumanMessage):
        cut -= 1
    if cut == len(history):
        return None
    return "\n\n".join(m.text for m in history[cut:]), history[:cut]


# -- finding a response --------------------------------------------------------------------


def _starts_turn(message: BaseMessage, previous: BaseMessage | None) -> bool:
    """Whether ``message`` (after ``previous``) opens a turn, a response's input: the user's
    message, or the first of the results the client sent for its function calls (the
    results of the server's own tools, inside a turn, carry no such id)."""
    if isinstance(message, ToolMessage):
        sent = (message.id or "").startswith(RESULT_PREFIX)
        return sent and not isinstance(previous, ToolMessage)
    return isinstance(message, HumanMessage)


@dataclass
class _Found:
    """A stored response: its id, its session's key and its messages."""

    id: ResponseId
    key: str
    messages: list[BaseMessage]
    count: int  # the session's messages now

    @property
    def end(self) -> int:
        return self.id.start + len(self.messages)

    @property
    def newest(self) -> bool:
        return self.end == self.count


async def _find(service: Service, user: User, text: str) -> _Found:
    """The caller's response ``text`` names.

    Raises:
        HTTPProblem: 404 when it names none of the caller's responses.
    """
    rid = ResponseId.parse(text)
    if rid is None:
        raise _not_found(text)
    key = session_key(user, rid.session_id)
    store = service.bot.store
    count = await store.acount(key)
    if rid.start >= count:
        raise _not_found(text)
    before = rid.start - 1 if rid.start else 0
    first = await store.aload(key, before, rid.start + _PAGE)
    previous = first.pop(0) if rid.start else None
    if not first or not _starts_turn(first[0], previous):
        raise _not_found(text)  # not where a response starts
    messages: list[BaseMessage] = []
    page, position = first, rid.start + len(first)
    while True:
        for message in page:
            if messages and _starts_turn(message, messages[-1]):  # the next response's input
                return _Found(rid, key, messages, count)
            messages.append(message)
        if position >= count:
            return _Found(rid, key, messages, count)
        page = await store.aload(key, position, position + _PAGE)
        if not page:
            return _Found(rid, key, messages, count)
        position += len(page)


async def _fork(service: Service, user: User, found: _Found) -> ResponseId:
    """A new session holding ``found``'s session up to and with ``found``."""
    store = service.bot.store
    rid = ResponseId.new(found.end)
    key = session_key(user, rid.session_id)
    history = await store.aload(found.key, 0, found.end)
    summary = await store.aget_summary(found.key)
    kept = summary if summary is not None and summary.covers <= found.end else None
    await _write_session(service, key, history, kept)
    return rid


async def _write_session(
    service: Service, key: str, messages: Sequence[BaseMessage], summary: Summary | None = None
) -> None:
    store = service.bot.store
    async with store.alock(key):
        await asyncio.to_thread(store.replace_session, key, messages, summary)


# -- the response object -------------------------------------------------------------------


def _usage_json(usage: Usage) -> dict[str, Any]:
    """A turn's usage as the Responses API writes it, plus ``cost_usd``."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
        "cost_usd": usage.cost_usd,
    }


def _stored_usage(messages: Sequence[BaseMessage]) -> dict[str, Any]:
    """The usage the response's calls reported, summed from its stored replies."""
    prompt = completion = cached = reasoning = 0
    for message in messages:
        meta = getattr(message, "usage_metadata", None)
        if not isinstance(message, AIMessage) or not meta:
            continue
        prompt += meta.get("input_tokens", 0)
        completion += meta.get("output_tokens", 0)
        cached += (meta.get("input_token_details") or {}).get("cache_read", 0) or 0
        reasoning += (meta.get("output_token_details") or {}).get("reasoning", 0) or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _message_item(rid: ResponseId, text: str, status: str = "completed") -> dict[str, Any]:
    content = [] if status == "in_progress" else [_text_part(text)]
    return {
        "id": f"msg_{rid.conversation}_{rid.start}_reply",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(
    call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": f"fc_{call_id}",
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _output_items(rid: ResponseId, reply: BaseMessage | None) -> list[dict[str, Any]]:
    """A reply as output items: its text (if any, or if it calls nothing), then one
    ``function_call`` per call of the client's tools."""
    text = "" if reply is None else reply.text
    calls = reply.tool_calls if isinstance(reply, AIMessage) else []
    items = [_message_item(rid, text)] if text or not calls else []
    for call in calls:
        arguments = json.dumps(call["args"], ensure_ascii=False)
        items.append(_call_item(str(call["id"]), call["name"], arguments))
    return items


def _response_object(
    rid: ResponseId,
    body: ResponseRequest | None,
    *,
    model: str,
    status: str = "completed",
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    instructions: str | None = None,
    previous: str | None = None,
    incomplete: str | None = None,
) -> dict[str, Any]:
    """A response as OpenAI writes it (``body``: the request, whose settings it echoes;
    ``None`` for a stored response, whose request settings are not kept)."""
    text: dict[str, Any] = {"format": {"type": "text"}}
    if body is not None and body.text is not None and body.text.format is not None:
        text = {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)}
    return {
        "id": str(rid),
        "object": "response",
        "created_at": rid.created,
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None,
        "incomplete_details": None if incomplete is None else {"reason": incomplete},
        "instructions": instructions,
        "max_output_tokens": body.max_output_tokens if body else None,
        "model": model,
        "output": output or [],
        "parallel_tool_calls": body.parallel_tool_calls is not False if body else True,
        "previous_response_id": previous,
        "reasoning": {"effort": None, "summary": None},
        "store": body.store is not False if body else True,
        "temperature": None,
        "text": text,
        "tool_choice": (body.tool_choice or "auto") if body else "auto",
        "tools": (body.tools or []) if body else [],
        "top_p": None,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": (body.metadata or {}) if body else {},
    }


def _final_reply(messages: Sequence[BaseMessage]) -> AIMessage | None:
    """A stored response's reply: its last AI message.

    The server's own tools (``serve --tools``) ran inside the turn: their calls and results
    are stored with it (before the reply) but are not the client's to run, so they are not
    output.
    """
    return next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)


def _input_items(rid: ResponseId, messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """The response's input, as the items that made it (before the first reply)."""
    items: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if isinstance(message, AIMessage):
            break
        item_id = f"msg_{rid.conversation}_{rid.start + index}"
        if isinstance(message, ToolMessage):
            items.append(
                {
                    "id": item_id,
                    "type": "function_call_output",
                    "call_id": message.tool_call_id,
                    "output": message.text,
                    "status": "completed",
                }
            )
        else:
            items.append(
                {
                    "id": item_id,
                    "type": "message",
                    "role": "user",
                    "status": "completed",
                    "content": [{"type": "input_text", "text": message.text}],
                }
            )
    return items


# -- the routes ----------------------------------------------------------------------------


class _Call:
    """One request's turn, once its session (or, with store=false, its messages) is ready."""

    def __init__(self, service: Service, user: User, body: ResponseRequest) -> None:
        self.service = service
        self.bot = service.bot_for(body.model)  # 404 model_not_found for a model not served
        self.user = user
        self.body = body
        self.input = _read_input(body)
        self.options = _options(body)
        self.model = self.bot.settings.model
        self.previous: str | None = body.previous_response_id
        self.stateful = body.store is not False
        self.rid = ResponseId.new()
        self.key = session_key(user, self.rid.session_id)
        self.messages: list[BaseMessage] = []
        self.made = False  # whether `prepare` wrote a session (seeded or forked)

    async def prepare(self) -> None:
        """Find the session the turn runs on (continued, forked or new) and fill it."""
        found = None
        if self.previous is not None:
            found = await _find(self.service, self.user, self.previous)
            if self.input.history:
                raise _bad(
                    "With previous_response_id the input is only the new turn: the user "
                    "message (or function_call_output items); the server keeps the rest."
                )
        if not self.stateful:
            await self._prepare_stateless(found)
        elif found is None:
            self.rid = ResponseId.new(len(self.input.history), self.rid.conversation)
            if self.input.history:
                await _write_session(self.service, self.key, self.input.history)
                self.made = True
        elif found.newest and await self.bot.store.aread_pending(found.key) is None:
            self.rid = ResponseId.new(found.end, found.id.conversation)
        else:
            self.rid = await _fork(self.service, self.user, found)
            self.made = True
        self.key = session_key(self.user, self.rid.session_id)

    async def discard(self) -> None:
        """After a turn that stored nothing: remove the session `prepare` wrote for it (a
        new conversation's history, a fork), which no response names."""
        if self.made and not await self.bot.store.acount(self.key) > self.rid.start:
            await asyncio.to_thread(self.bot.delete, self.key)

    async def find_place(self, reply: BaseMessage) -> None:
        """Make the id name where the turn was stored: after ``prepare``, another turn on
        the session (a request continuing the same response at the same moment) may have
        been stored first, and this one after it."""
        if reply.id is None:
            return
        store = self.bot.store
        stored = await store.aload(self.key, self.rid.start)
        at = next((i for i in reversed(range(len(stored))) if stored[i].id == reply.id), None)
        if at is None:
            return
        while at > 0 and not _starts_turn(stored[at], stored[at - 1]):
            at -= 1
        if at:
            self.rid = ResponseId(self.rid.conversation, self.rid.start + at, self.rid.created)

    async def _prepare_stateless(self, found: _Found | None) -> None:
        history = list(self.input.history)
        if found is not None:
            store = self.bot.store
            history = [*await store.aload(found.key, 0, found.end), *history]
        turn = self.input.turn
        asked = [HumanMessage(turn)] if isinstance(turn, str) else list(turn)
        self.messages = [*self.bot.system_messages(), *history, *asked]

    @property
    def instructions(self) -> str | None:
        return "\n\n".join(self.input.instructions) or None

    async def reply(self) -> Reply:
        bot, limits = self.bot, self.service.users.limits(self.user)
        name, options = self.user.name, self.options
        if self.stateful:
            return await bot.achat(
                self.input.turn, session_id=self.key, user_id=name, limits=limits, options=options
            )
        return await bot.achat_messages(
            self.messages, session_id=self.key, user_id=name, limits=limits, options=options
        )

    def stream(self) -> AsyncReplyStream:
        bot, limits = self.bot, self.service.users.limits(self.user)
        name, options = self.user.name, self.options
        if self.stateful:
            return bot.astream(
                self.input.turn, session_id=self.key, user_id=name, limits=limits, options=options
            )
        return bot.astream_messages(
            self.messages, session_id=self.key, user_id=name, limits=limits, options=options
        )

    def response(
        self,
        *,
        status: str,
        output: list[dict[str, Any]] | None = None,
        usage: dict[str, Any] | None = None,
        model: str | None = None,
        incomplete: str | None = None,
    ) -> dict[str, Any]:
        return _response_object(
            self.rid,
            self.body,
            model=model or self.model,
            status=status,
            output=output,
            usage=usage,
            instructions=self.instructions,
            previous=self.previous,
            incomplete=incomplete,
        )


def _ending(finish_reason: str | None) -> tuple[str, str | None]:
    """The response's status and incomplete reason for how its reply ended."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None


@router.post("/responses")
async def create_response(
    body: ResponseRequest, request: Request, user: Caller, service: ServiceDep
) -> Any:
    """OpenAI's Responses API over chatchain's sessions (JSON, or semantic events with
    ``"stream": true``): authenticated, metered and capped."""
    _metrics.serving(ROUTE)
    _refuse_unsupported(body)
    call = _Call(service, user, body)
    await call.prepare()
    try:
        if body.stream:
            tools = bool(call.options and call.options.tools)
            return await relay(request, service, user, call.stream, _Events(call), tools=tools)
        reply = await call.reply()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await call.discard()
        raise
    if call.stateful:
        await call.find_place(reply.message)
    status, incomplete = _ending(reply.message.response_metadata.get("finish_reason"))
    return call.response(
        status=status,
        output=_output_items(call.rid, reply.message),
        usage=_usage_json(reply.usage),
        model=reply.usage.model or call.model,
        incomplete=incomplete,
    )


@router.get("/responses/{response_id}")
async def get_response(response_id: str, user: Caller, service: ServiceDep) -> Any:
    """A stored response of yours: its output, status and the usage its calls reported."""
    found = await _find(service, user, response_id)
    reply = _final_reply(found.messages)
    model = service.settings.model
    status: str = "completed"
    incomplete = None
    if reply is not None:
        model = reply.response_metadata.get("model_name") or model
        status, incomplete = _ending(reply.response_metadata.get("finish_reason"))
        if reply.response_metadata.get("interrupted"):
            status, incomplete = "incomplete", "interrupted"
    return _response_object(
        found.id,
        None,
        model=model,
        status=status,
        output=_output_items(found.id, reply),
        usage=_stored_usage(found.messages),
        incomplete=incomplete,
    )


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, user: Caller, service: ServiceDep) -> Any:
    """Delete the conversation (session) the response belongs to: all its responses go."""
    found = await _find(service, user, response_id)
    await asyncio.to_thread(service.bot.delete, found.key)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    user: Caller,
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    include: Annotated[list[str] | None, Query(alias="include[]")] = None,
) -> Any:
    """The items the response was given as its input (``desc``: newest first, as OpenAI)."""
    found = await _find(service, user, response_id)
    items = _input_items(found.id, found.messages)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


# -- streaming -----------------------------------------------------------------------------


class _Events:
    """The semantic events of one streamed response, each with its ``sequence_number``.

    The output items open as their first piece comes: the reply's text (one ``message``
    item), then each call of the client's tools (a ``function_call`` item, its arguments in
    ``response.function_call_arguments.delta`` events); each is closed at the end.
    """

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.sequence = 0
        self.opened: list[dict[str, Any]] = []  # the output items, in their order
        self.text_at: int | None = None  # the message item's output_index
        self.calls_at: dict[int, int] = {}  # a call's index in the reply -> output_index

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\r\ndata: {text}\r\n\r\n".encode()

    def start(self) -> bytes:
        opened = self.call.response(status="in_progress")
        return self._event("response.created", response=opened) + self._event(
            "response.in_progress", response=opened
        )

    def _open(self, item: dict[str, Any]) -> bytes:
        self.opened.append(item)
        return self._event(
            "response.output_item.added", output_index=len(self.opened) - 1, item=item
        )

    def pieces(self, pieces: Sequence[Piece]) -> bytes:
        events = []
        for piece in texts_joined(pieces):
            if isinstance(piece, str):
                events.append(self._text(piece))
            elif isinstance(piece, ToolCallDelta):
                events.append(self._call_piece(piece))
        return b"".join(events)

    def _text(self, text: str) -> bytes:
        events = b""
        if self.text_at is None:
            self.text_at = len(self.opened)
            events += self._open(_message_item(self.call.rid, "", "in_progress"))
            events += self._event(
                "response.content_part.added",
                item_id=self.opened[self.text_at]["id"],
                output_index=self.text_at,
                content_index=0,
                part=_text_part(""),
            )
        return events + self._event(
            "response.output_text.delta",
            item_id=self.opened[self.text_at]["id"],
            output_index=self.text_at,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def _call_piece(self, delta: ToolCallDelta) -> bytes:
        events = b""
        at = self.calls_at.get(delta.index)
        if at is None:
            at = self.calls_at[delta.index] = len(self.opened)
            call_id = delta.id or f"call_{self.call.rid.conversation}_{delta.index}"
            events += self._open(_call_item(call_id, delta.name or "", "", "in_progress"))
        if not delta.arguments:
            return events
        self.opened[at]["arguments"] += delta.arguments
        return events + self._event(
            "response.function_call_arguments.delta",
            item_id=self.opened[at]["id"],
            output_index=at,
            delta=delta.arguments,
        )

    def end(self, stream: AsyncReplyStream) -> bytes:
        assert stream.usage is not None  # set when the stream ended
        call = self.call
        items = _output_items(call.rid, stream.message)
        events = []
        if self.text_at is None and items and items[0]["type"] == "message":
            events.append(self._text(""))  # a reply without text still has its message
        for at, opened in enumerate(self.opened):
            final = next((i for i in items if i["id"] == opened["id"]), None) or opened
            events.append(self._close(at, final))
        status, incomplete = _ending(stream.finish_reason)
        done = call.response(
            status=status,
            output=[next((i for i in items if i["id"] == o["id"]), o) for o in self.opened],
            usage=_usage_json(stream.usage),
            model=stream.usage.model or call.model,
            incomplete=incomplete,
        )
        events.append(self._event(f"response.{status}", response=done))
        return b"".join(events)

    def _close(self, at: int, item: dict[str, Any]) -> bytes:
        if item["type"] == "function_call":
            done = self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=at,
                name=item["name"],
                arguments=item["arguments"],
            )
            return done + self._event("response.output_item.done", output_index=at, item=item)
        text = item["content"][0]["text"] if item["content"] else ""
        place = {"item_id": item["id"], "output_index": at, "content_index": 0}
        return b"".join(
            (
                self._event("response.output_text.done", **place, text=text, logprobs=[]),
                self._event("response.content_part.done", **place, part=_text_part(text)),
                self._event("response.output_item.done", output_index=at, item=item),
            )
        )

    def error(self, kind: str, status: int, message: str) -> bytes:
        _, body, _ = openai_error(status, kind, message)
        error = body["error"]
        return self._event("error", code=error["code"], message=message, param=None, error=error)
