"""Tool calling inside a turn: the tools, running them, and the loop that calls the model.

One turn with tools is: call the model (sent the tools with ``bind_tools``); while it asks for
tools, run them (the calls of one step at once), send their results as ``ToolMessage``s and
call it again; stop at its final answer. After ``CHATCHAIN_TOOL_ROUNDS`` rounds the model is
called once more without tools, so that it must answer, and the reply carries a notice.

Nothing a tool does can break the turn: an exception, a call past ``CHATCHAIN_TOOL_TIMEOUT``,
a tool name the model made up and arguments that do not validate all go back to the model as
the tool's result, with ``status="error"``. Results longer than
``CHATCHAIN_TOOL_RESULT_TOKENS`` are cut, with a note. Tools run in a context of their own,
with a config holding only the session and user ids: never the turn, its settings or the
API key.

The turn (`chatchain._turn.Turn`) keeps the exchange: the AI messages with tool calls and
their results are saved with the user's message and the final reply in one write, and each
model call is held in the budget before it is sent.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableWithFallbacks
from langchain_core.runnables.base import RunnableBindingBase
from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ValidationError

from chatchain import _flow
from chatchain._flow import END, Pull, call
from chatchain._streaming import StreamedReply, shared_text
from chatchain.errors import ConfigurationError

if TYPE_CHECKING:
    from chatchain._tokens import TokenCounter
    from chatchain._turn import Turn

__all__ = [
    "ToolEvent",
    "ToolFinished",
    "ToolLoop",
    "ToolRun",
    "ToolStarted",
    "Toolbox",
    "bind_tools",
]

INTERRUPTED = "The turn was stopped before this tool finished; its result is unknown."


@dataclass(frozen=True)
class ToolRun:
    """A tool that ran in a turn: the call the model made, and how it went.

    Not LangChain's ``ToolCall`` (the model's request only: ``AIMessage.tool_calls``).

    Attributes:
        id: The call's id (what its ``ToolMessage``'s ``tool_call_id`` answers).
        name: The tool the model asked for.
        args: The arguments it gave.
        result: What was sent back to the model (the error text when it failed).
        status: ``"success"``, or ``"error"`` when the tool raised, timed out, did not
            exist or was given arguments that do not validate.
        error: What went wrong, or ``None``.
        seconds: How long the tool ran.
    """

    id: str
    name: str
    args: dict[str, Any]
    result: str
    status: Literal["success", "error"] = "success"
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class ToolStarted:
    """A tool call is about to run (an event on a reply stream, or to ``on_tool``)."""

    id: str
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class ToolFinished:
    """A tool call ended, well or not (see ``call.status``); ``call`` is its `ToolRun`."""

    call: ToolRun


ToolEvent = ToolStarted | ToolFinished
"""What ``on_tool`` receives and what `ReplyStream.events` yields besides text."""


def _as_tool(tool: Any) -> BaseTool:
    if isinstance(tool, BaseTool):
        return tool
    if not callable(tool):
        raise ConfigurationError(
            f"tools=[...] takes LangChain tools and functions, not {type(tool).__name__}: "
            "pass a function with type hints and a docstring, or a @tool."
        )
    try:
        if asyncio.iscoroutinefunction(tool):
            return StructuredTool.from_function(coroutine=tool)
        return StructuredTool.from_function(tool)
    except (ValueError, TypeError) as exc:
        name = getattr(tool, "__name__", repr(tool))
        raise ConfigurationError(
            f"The tool {name!r} cannot be described to the model ({exc}): give the function "
            "type hints and a docstring saying what it does, or wrap it with @tool."
        ) from exc


@dataclass(frozen=True)
class Toolbox:
    """A turn's tools, with their rounds, timeout and result size.

    Attributes:
        tools: The tools by name.
        rounds: ``CHATCHAIN_TOOL_ROUNDS``.
        timeout: ``CHATCHAIN_TOOL_TIMEOUT``, in seconds.
        result_tokens: ``CHATCHAIN_TOOL_RESULT_TOKENS``.
    """

    tools: Mapping[str, BaseTool]
    rounds: int = 5
    timeout: float = 30.0
    result_tokens: int = 2000
    schemas: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(
        cls, tools: Sequence[Any], rounds: int = 5, timeout: float = 30.0, result_tokens: int = 2000
    ) -> Toolbox:
        """The toolbox of LangChain tools and plain functions (sync or async).

        Raises:
            ConfigurationError: A tool cannot be described, or two share a name.
        """
        named: dict[str, BaseTool] = {}
        for tool in map(_as_tool, tools):
            if tool.name in named:
                raise ConfigurationError(
                    f"Two tools are named {tool.name!r}: the model tells tools apart by name, "
                    "so give one another name (e.g. @tool('other_name'))."
                )
            named[tool.name] = tool
        schemas = [convert_to_openai_tool(tool) for tool in named.values()]
        return cls(named, rounds, timeout, result_tokens, schemas)

    def schema_tokens(self, counter: TokenCounter) -> int:
        """The prompt tokens the tools' schemas add to a call sent with them."""
        return counter.count_tools(self.schemas)

    # -- one call -------------------------------------------------------------------------

    def _unknown(self, name: str) -> str:
        known = ", ".join(sorted(self.tools)) or "none"
        return f"There is no tool named {name!r}; the tools are: {known}. Call one of those."

    def _invalid(self, name: str, exc: ValidationError) -> str:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'arguments'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        return f"The arguments for {name!r} are not valid ({problems}). Fix them and call again."

    def _timed_out(self, name: str) -> str:
        return (
            f"The tool {name!r} did not finish within {self.timeout:g} s "
            "(CHATCHAIN_TOOL_TIMEOUT) and was cancelled."
        )

    def _config(self, turn: Turn) -> RunnableConfig:
        # A config of the tool's own: nothing of the turn (its settings hold the API key).
        configurable: dict[str, Any] = {"session_id": turn.session_id}
        if turn.user_id is not None:
            configurable["user_id"] = turn.user_id
        return {"configurable": configurable, "callbacks": None}

    def _check(self, request: Mapping[str, Any]) -> tuple[BaseTool | None, str | None]:
        """The tool of a call, or the error to send back instead of running it."""
        name = request.get("name") or ""
        tool = self.tools.get(name)
        if tool is None:
            return None, self._unknown(name)
        if request.get("error") is not None or not isinstance(request.get("args"), dict):
            detail = request.get("error") or "they are not a JSON object"
            return None, f"The arguments for {name!r} could not be read ({detail}). Send JSON."
        return tool, None

    def run_one(
        self, tool: BaseTool, request: Mapping[str, Any], turn: Turn
    ) -> tuple[str, str | None]:
        """Run a tool in this thread: its result text, or ``("", error)``."""
        call = _tool_call(request)
        try:
            if isinstance(tool, StructuredTool) and tool.func is None and tool.coroutine:
                output = asyncio.run(tool.ainvoke(call, self._config(turn)))
            else:
                output = tool.invoke(call, self._config(turn))
        except ValidationError as exc:
            return "", self._invalid(tool.name, exc)
        except Exception as exc:
            return "", f"{type(exc).__name__}: {exc}"
        return _outcome(output)

    async def arun_one(
        self, tool: BaseTool, request: Mapping[str, Any], turn: Turn
    ) -> tuple[str, str | None]:
        """`run_one` for async turns (a sync tool runs in a thread)."""
        try:
            output = await tool.ainvoke(_tool_call(request), self._config(turn))
        except ValidationError as exc:
            return "", self._invalid(tool.name, exc)
        except Exception as exc:
            return "", f"{type(exc).__name__}: {exc}"
        return _outcome(output)

    def finish(
        self,
        request: Mapping[str, Any],
        outcome: tuple[str, str | None],
        seconds: float,
        counter: TokenCounter,
    ) -> tuple[ToolRun, ToolMessage]:
        """The record of a call and the message that answers it, the result cut to size."""
        text, error = outcome
        status: Literal["success", "error"] = "error" if error is not None else "success"
        result = self._bounded(text if error is None else f"Error: {error}", counter)
        call = ToolRun(
            id=str(request.get("id") or ""),
            name=str(request.get("name") or ""),
            args=dict(request["args"]) if isinstance(request.get("args"), dict) else {},
            result=result,
            status=status,
            error=error,
            seconds=seconds,
        )
        message = ToolMessage(result, tool_call_id=call.id, name=call.name, status=status)
        return call, message

    def _bounded(self, text: str, counter: TokenCounter) -> str:
        """``text``, cut to ``result_tokens`` tokens with a note when longer."""
        tokens = _tokens(text, counter)
        if tokens <= self.result_tokens:
            return text
        keep = len(text) * self.result_tokens // tokens
        while keep > 0 and _tokens(text[:keep], counter) > self.result_tokens:
            keep = keep * 9 // 10
        return (
            f"{text[:keep]}\n[The result was cut: it was about {tokens:,} tokens and "
            f"CHATCHAIN_TOOL_RESULT_TOKENS keeps {self.result_tokens:,}.]"
        )

    # -- one step: every call the model asked for at once ---------------------------------

    def run_step(self, requests: list[dict[str, Any]], turn: Turn) -> Iterator[ToolEvent]:
        """Run a step's calls at once, each in a thread; yield events as they start and end."""
        counter = turn.spec.recall.counter
        done: queue.SimpleQueue[tuple[int, tuple[str, str | None], float]] = queue.SimpleQueue()
        pending: dict[int, float] = {}
        for index, request in enumerate(requests):
            yield turn.tool_started(request)
            tool, error = self._check(request)
            if tool is None:
                yield turn.tool_finished(*self.finish(request, ("", error), 0.0, counter))
                continue
            pending[index] = time.perf_counter()
            # A thread without the turn's context: LangChain's config lives in a context var.
            worker = threading.Thread(
                target=contextvars.Context().run,
                args=(self._work, done, index, tool, request, turn),
                name=f"chatchain-tool-{tool.name}",
                daemon=True,  # a tool that never returns must not keep the process alive
            )
            worker.start()
        until = time.monotonic() + self.timeout
        while pending:
            try:
                index, outcome, seconds = done.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                break
            pending.pop(index)
            yield turn.tool_finished(*self.finish(requests[index], outcome, seconds, counter))
        for index, started in pending.items():  # past the timeout: given up on
            request = requests[index]
            timed_out = ("", self._timed_out(str(request["name"])))
            elapsed = time.perf_counter() - started
            yield turn.tool_finished(*self.finish(request, timed_out, elapsed, counter))

    def _work(
        self,
        done: queue.SimpleQueue[tuple[int, tuple[str, str | None], float]],
        index: int,
        tool: BaseTool,
        request: Mapping[str, Any],
        turn: Turn,
    ) -> None:
        started = time.perf_counter()
        outcome = self.run_one(tool, request, turn)
        done.put((index, outcome, time.perf_counter() - started))

    async def arun_step(
        self, requests: list[dict[str, Any]], turn: Turn
    ) -> AsyncIterator[ToolEvent]:
        """`run_step` for async turns: async tools as tasks, sync ones in threads."""
        counter = turn.spec.recall.counter
        tasks: dict[asyncio.Task[tuple[str, str | None]], tuple[int, float]] = {}
        loop = asyncio.get_running_loop()
        try:
            for index, request in enumerate(requests):
                yield turn.tool_started(request)
                tool, error = self._check(request)
                if tool is None:
                    yield turn.tool_finished(*self.finish(request, ("", error), 0.0, counter))
                    continue
                # A task without the turn's context (see `run_step`).
                task = loop.create_task(
                    self.arun_one(tool, request, turn), context=contextvars.Context()
                )
                tasks[task] = (index, time.perf_counter())
            until = time.monotonic() + self.timeout
            while tasks:
                finished, _ = await asyncio.wait(
                    tasks,
                    timeout=max(0.0, until - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not finished:
                    break
                for task in finished:
                    index, started = tasks.pop(task)
                    seconds = time.perf_counter() - started
                    yield turn.tool_finished(
                        *self.finish(requests[index], task.result(), seconds, counter)
                    )
            for task, (index, started) in list(tasks.items()):
                task.cancel()
                request = requests[index]
                timed_out = ("", self._timed_out(str(request["name"])))
                elapsed = time.perf_counter() - started
                yield turn.tool_finished(*self.finish(request, timed_out, elapsed, counter))
                tasks.pop(task)
        finally:
            for task in tasks:  # the turn was stopped: its tools are too
                task.cancel()


def _tokens(text: str, counter: TokenCounter) -> int:
    return counter([ToolMessage(text, tool_call_id="")])


def _tool_call(request: Mapping[str, Any]) -> dict[str, Any]:
    """A call as LangChain's tools take it, so that they answer with a `ToolMessage`."""
    return {
        "type": "tool_call",
        "name": request["name"],
        "args": request["args"],
        "id": str(request.get("id") or ""),
    }


def _outcome(output: Any) -> tuple[str, str | None]:
    """A tool's result text, or ``("", error)`` for a result it marked as an error (e.g. a
    tool with ``handle_tool_error``)."""
    if isinstance(output, ToolMessage):
        text = output.text
        return ("", text) if output.status == "error" else (text, None)
    if isinstance(output, str):
        return output, None
    try:
        return json.dumps(output, ensure_ascii=False), None
    except (TypeError, ValueError):
        return str(output), None


def requests_of(message: AIMessage) -> list[dict[str, Any]]:
    """The calls an AI message asks for, the unreadable ones (bad JSON) included."""
    calls: list[dict[str, Any]] = [dict(call) for call in message.tool_calls]
    for bad in message.invalid_tool_calls:
        calls.append(
            {
                "name": bad.get("name"),
                "args": bad.get("args"),
                "id": bad.get("id"),
                "error": bad.get("error") or "not valid JSON",
            }
        )
    return calls


def bind_tools(
    model: Runnable[Any, Any], tools: Sequence[Any], **options: Any
) -> Runnable[Any, Any]:
    """``model`` sent ``tools`` with each call (its fallbacks too), and ``options`` of its
    ``bind_tools`` (``tool_choice``, ``parallel_tool_calls``).

    Raises:
        ConfigurationError: The model cannot call tools.
    """
    if isinstance(model, RunnableWithFallbacks):
        return model.model_copy(
            update={
                "runnable": bind_tools(model.runnable, tools, **options),
                "fallbacks": [
                    bind_tools(fallback, tools, **options) for fallback in model.fallbacks
                ],
            }
        )
    if isinstance(model, RunnableBindingBase):  # keep what .bind(...) and wrappers add
        return model.model_copy(update={"bound": bind_tools(model.bound, tools, **options)})
    bind = getattr(model, "bind_tools", None)
    try:
        if bind is None:
            raise NotImplementedError
        bound: Runnable[Any, Any] = bind(list(tools), **options)
    except NotImplementedError:
        raise ConfigurationError(
            f"The model ({type(model).__name__}) cannot call tools: use a chat model that "
            "supports bind_tools (ChatOpenAI does), or leave tools out."
        ) from None
    return bound


@dataclass(frozen=True)
class _Final:
    """The loop's answer, at the end of its items (never shown to a stream's reader)."""

    message: BaseMessage


class ToolLoop(Runnable[Any, Any]):
    """The model, called again while it asks for tools (the turn's step of the chain).

    Its input is the prompt (the messages the chain built); it returns the final reply, and
    records the exchange on its turn (found in the run's configurable). Streamed, it yields
    the chunks of every call and the tool events between them.
    """

    def __init__(
        self, with_tools: Runnable[Any, Any], without: Runnable[Any, Any], toolbox: Toolbox
    ) -> None:
        self.with_tools = with_tools
        self.model = without
        self.toolbox = toolbox

    def _turn(self, config: RunnableConfig | None) -> Turn:
        from chatchain._turn import TURN_KEY, Turn

        turn = (config or {}).get("configurable", {}).get(TURN_KEY)
        if not isinstance(turn, Turn):
            raise ConfigurationError(
                "A chain with tools runs its turns itself: call the chain (invoke, stream, "
                "...), not its model step."
            )
        return turn

    def _model(self, turn: Turn, round_: int, messages: list[BaseMessage]) -> Runnable[Any, Any]:
        """The model for this round, its call held in the budget (the first one already is)."""
        last = round_ >= self.toolbox.rounds
        if last:
            turn.notice(
                f"The model still asked for tools after {self.toolbox.rounds} rounds "
                "(CHATCHAIN_TOOL_ROUNDS); it was asked to answer without them."
            )
        return self.model if last else self.with_tools

    def _count(self, turn: Turn, messages: list[BaseMessage], tools: bool) -> Callable[[], int]:
        counter = turn.spec.recall.counter
        extra = self.toolbox.schema_tokens(counter) if tools else 0
        snapshot = list(messages)
        return lambda: counter(snapshot) + extra

    def _steps(
        self, messages: list[BaseMessage], config: RunnableConfig | None, streaming: bool
    ) -> Generator[Any, Any, None]:
        """The rounds of a turn, as a stream flow (see `_flow`): the model's chunks and the
        tool events, then the `_Final` reply."""
        turn = self._turn(config)
        messages = list(messages)
        for round_ in range(self.toolbox.rounds + 1):
            model = self._model(turn, round_, messages)
            if round_:
                yield from turn.sending_flow(self._count(turn, messages, model is self.with_tools))
            if streaming:
                reply = yield from self._streamed(model, messages, config)
            else:
                reply = yield call(model, "invoke", messages, config)
            requests = requests_of(reply) if model is self.with_tools else []
            if not requests:
                yield _Final(turn.final(reply))
                return
            reply = turn.open_step(reply)
            events = Pull(
                partial(self.toolbox.run_step, requests, turn),
                partial(self.toolbox.arun_step, requests, turn),
            )
            while (event := (yield events)) is not END:
                yield event
            messages += turn.close_step()

    @staticmethod
    def _streamed(
        model: Runnable[Any, Any], messages: list[BaseMessage], config: RunnableConfig | None
    ) -> Generator[Any, Any, AIMessage]:
        folded = StreamedReply(shared_text(config))  # the reply's text, not its chunks
        source = Pull(
            lambda: model.stream(messages, config), lambda: model.astream(messages, config)
        )
        # No cleanup effect here: LangChain leaves a stream it stops reading to the garbage
        # collector, which may close this flow before its driver (a yield then is an error).
        while (chunk := (yield source)) is not END:
            if isinstance(chunk, AIMessageChunk):
                folded.add(chunk)
            yield chunk
        return folded.message()

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        for item in _flow.stream(self._steps(_messages(input), config, streaming=False)):
            if isinstance(item, _Final):
                return item.message
        raise AssertionError("the tool loop ended without a reply")  # pragma: no cover

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        async for item in _flow.astream(self._steps(_messages(input), config, streaming=False)):
            if isinstance(item, _Final):
                return item.message
        raise AssertionError("the tool loop ended without a reply")  # pragma: no cover

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        for item in _flow.stream(self._steps(_messages(input), config, streaming=True)):
            if not isinstance(item, _Final):
                yield item

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        async for item in _flow.astream(self._steps(_messages(input), config, streaming=True)):
            if not isinstance(item, _Final):
                yield item


def _messages(value: Any) -> list[BaseMessage]:
    to_messages = getattr(value, "to_messages", None)
    return list(to_messages() if to_messages is not None else value)
