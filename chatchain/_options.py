"""A call's own model options: the client's tools and structured output, never run here.

`ModelOptions` carries what an OpenAI client sends besides its messages: its function
``tools``, ``tool_choice``, ``parallel_tool_calls``, ``response_format`` and its own cap on
the reply, ``max_tokens``. A turn given
options sends them to the model with that one call; chatchain does not run the client's
tools: the model's reply, an ``AIMessage`` with ``tool_calls``, is the turn's reply, and the
client runs the tools and sends their results (``ToolMessage``s) as its next turn.

The options are metered like the rest of the prompt: the tools' JSON and the response
format's schema count in the prompt tokens of the budget hold, so a hold is never below what
the endpoint bills. With ``response_format`` of type ``json_schema`` the reply is checked
against the schema (`check_reply`): a reply that does not fit raises `StructuredReplyError`,
metered, nothing stored. A streamed turn with a ``json_schema`` asks for the reply whole,
checks it, then yields it as one chunk (a reply that does not fit was never shown).

Continuing a session with the tools' results: the turn's input is the list of
``ToolMessage``s answering every call of the session's last message (an AI message with
``tool_calls``), checked by `pending_calls` before anything is sent. The exchange is stored
whole: the user's message and the AI message with its calls by the first turn, the results
and the reply by the next; the window never splits them (see `chatchain.window`).

Client tools and the deployment's own tools (``tools=`` of the chain, ``serve --tools``) do
not meet in one turn: a turn with client tools on a chain that has tools of its own is
refused (`InvalidInputError`), since the model's calls could then not be told apart from
the ones chatchain must run. A structured turn (``schema=``) takes no options either.

The call's ``max_tokens`` is a lower cap, never a higher one: the reply takes at most the
smallest of it, the deployment's (``CHATCHAIN_MAX_TOKENS`` or the model's own
``max_tokens``) and what the budget hold pays for. The hold is sized for that smaller reply,
the call is sent with it, and a reply the endpoint runs past it is read no further (see
`chatchain._turn_money.ReplyMeter`). Options with only ``max_tokens`` change nothing else:
the chain's own tools and a ``schema=`` still work with them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.runnables import Runnable, RunnableConfig

from chatchain.errors import InvalidInputError, StructuredReplyError

if TYPE_CHECKING:
    from chatchain._tokens import TokenCounter

__all__ = [
    "OPTIONS_KEY",
    "ModelOptions",
    "ToolCallDelta",
    "check_reply",
    "deltas_of",
    "options_of",
    "pending_calls",
    "with_options",
]

OPTIONS_KEY = "__chatchain_options"
"""Where a run's configurable carries the call's `ModelOptions` (``__``: not traced)."""

_FORMATS = ("text", "json_object", "json_schema")


@dataclass(frozen=True)
class ModelOptions:
    """What one call sends the model besides its messages, in OpenAI's own format.

    Attributes:
        tools: The client's function tools, as OpenAI's ``tools`` writes them
            (``{"type": "function", "function": {"name", "description", "parameters",
            "strict"}}``). The model may call them; chatchain never runs them: the reply's
            ``tool_calls`` go back to the caller.
        tool_choice: ``"auto"``, ``"none"``, ``"required"`` or ``{"type": "function",
            "function": {"name": ...}}``; ``None`` leaves it to the model.
        parallel_tool_calls: Whether the model may call several tools at once; ``None``
            leaves it to the model.
        response_format: ``{"type": "json_object"}``, or ``{"type": "json_schema",
            "json_schema": {"name", "schema", "strict"}}`` (the reply is then checked against
            the schema), or ``None`` / ``{"type": "text"}`` for text.
        max_tokens: The most tokens the reply may take, a positive int, or ``None``. It
            only lowers the cap: the reply takes at most the smaller of this and the
            deployment's cap (``CHATCHAIN_MAX_TOKENS`` or the model's own ``max_tokens``),
            or what the budget can pay for if less. A reply cut by it ends with
            ``finish_reason`` ``"length"``.

    Raises:
        InvalidInputError: A tool or the response format is not in OpenAI's format, or
            ``max_tokens`` is not a positive int.

    Example:
        >>> from chatchain import Chatbot
        >>> from chatchain.testing import FakeChatModel, tool_call_reply
        >>> weather = {"type": "function", "function": {"name": "weather", "parameters": {
        ...     "type": "object", "properties": {"city": {"type": "string"}}}}}
        >>> calls = tool_call_reply(("weather", {"city": "Oslo"}))
        >>> bot = Chatbot(llm=FakeChatModel(replies=[calls]))
        >>> reply = bot.chat("Weather in Oslo?", options=ModelOptions(tools=(weather,)))
        >>> [(call["name"], call["args"]) for call in reply.message.tool_calls]
        [('weather', {'city': 'Oslo'})]
    """

    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: Mapping[str, Any] | None = None
    max_tokens: int | None = None
    _names: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tools", tuple(self.tools))
        names = [_tool_name(index, tool) for index, tool in enumerate(self.tools)]
        if len(set(names)) != len(names):
            raise InvalidInputError(
                "Two tools share a name: the model tells tools apart by name; rename one."
            )
        object.__setattr__(self, "_names", frozenset(names))
        _check_choice(self.tool_choice, self._names)
        _check_format(self.response_format)
        _check_max_tokens(self.max_tokens)

    @property
    def schema(self) -> Mapping[str, Any] | None:
        """The JSON schema the reply must fit (``response_format`` ``json_schema``), or ``None``."""
        response_format = self.response_format or {}
        if response_format.get("type") != "json_schema":
            return None
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        return schema if isinstance(schema, Mapping) else {}

    @property
    def sends_format(self) -> bool:
        """Whether ``response_format`` asks for something other than text."""
        return bool((self.response_format or {}).get("type", "text") != "text")

    def __bool__(self) -> bool:
        """Whether the options change what the model is sent besides ``max_tokens`` (tools,
        format): only such options take the call off the chain's own model step."""
        return bool(
            self.tools
            or self.tool_choice is not None
            or self.parallel_tool_calls is not None
            or self.sends_format
        )

    def bind(self, model: Runnable[Any, Any]) -> Runnable[Any, Any]:
        """``model`` sent these options with each call (its fallbacks too).

        Raises:
            ConfigurationError: Tools are given and the model cannot call tools.
        """
        from chatchain._tools import bind_tools

        if self.tools:
            choice: dict[str, Any] = {}
            if self.tool_choice is not None:
                choice["tool_choice"] = self.tool_choice
            if self.parallel_tool_calls is not None:
                choice["parallel_tool_calls"] = self.parallel_tool_calls
            model = bind_tools(model, [dict(tool) for tool in self.tools], **choice)
        elif self.tool_choice is not None:
            model = model.bind(tool_choice=self.tool_choice)
        if self.sends_format:  # bound apart: ChatOpenAI's bind_tools would make tools strict
            model = model.bind(response_format=dict(self.response_format or {}))
        return model

    def prompt_tokens(self, counter: TokenCounter) -> int:
        """The prompt tokens these options add to a call: the tools' JSON and the schema's."""
        tokens = counter.count_tools([dict(tool) for tool in self.tools])
        if self.sends_format:
            tokens += counter.count_tools([_format_as_tool(self.response_format or {})])
        return tokens


def _tool_name(index: int, tool: object) -> str:
    where = f"tools[{index}]"
    if not isinstance(tool, Mapping) or tool.get("type") != "function":
        raise InvalidInputError(
            f'{where}: only function tools are taken ({{"type": "function", "function": '
            "{...}}), as OpenAI's chat completions write them."
        )
    function = tool.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"{where}: the function has no name; give function.name.")
    parameters = function.get("parameters") if isinstance(function, Mapping) else None
    if parameters is not None and not isinstance(parameters, Mapping):
        raise InvalidInputError(f"{where}: function.parameters must be a JSON schema object.")
    return name


def _check_choice(choice: object, names: frozenset[str]) -> None:
    if choice is None or choice in ("auto", "none"):
        return
    if choice == "required":
        if not names:
            raise InvalidInputError('tool_choice "required" needs tools: send tools too.')
        return
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(choice, Mapping) or choice.get("type") != "function" or not name:
        raise InvalidInputError(
            'tool_choice must be "auto", "none", "required" or {"type": "function", '
            f'"function": {{"name": ...}}}}, not {choice!r}.'
        )
    if name not in names:
        raise InvalidInputError(
            f"tool_choice names the tool {name!r}, which is not among the tools sent "
            f"({', '.join(sorted(names)) or 'none'}): send it in tools, or name one of those."
        )


def _check_max_tokens(max_tokens: object) -> None:
    if max_tokens is None:
        return
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidInputError(
            f"max_tokens must be a positive whole number of tokens (or None), not {max_tokens!r}."
        )


def _check_format(response_format: object) -> None:
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind not in _FORMATS:
        raise InvalidInputError(
            f"response_format must have a type of {', '.join(_FORMATS)}; got {kind!r}."
        )
    assert isinstance(response_format, Mapping)
    if kind != "json_schema":
        return
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise InvalidInputError(
            'response_format json_schema needs {"json_schema": {"name": ..., "schema": '
            "{...}}}: give the schema a name."
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, Mapping):
        raise InvalidInputError("response_format json_schema.schema must be a JSON object.")
    from jsonschema import (  # type: ignore[import-untyped]  # no type hints of its own
        SchemaError,
        validators,
    )

    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise InvalidInputError(
            f"response_format json_schema.schema is not a valid JSON schema: {exc.message}"
        ) from None


def _format_as_tool(response_format: Mapping[str, Any]) -> dict[str, Any]:
    """The response format as a tool dict, to count its JSON as `count_tools` counts."""
    spec = response_format.get("json_schema")
    spec = spec if isinstance(spec, Mapping) else {}
    return {
        "type": "function",
        "function": {
            "name": str(spec.get("name") or response_format.get("type") or "format"),
            "parameters": dict(spec.get("schema") or {}),
        },
    }


def with_options(config: RunnableConfig, options: ModelOptions | None) -> RunnableConfig:
    """``config`` sending ``options`` with the call (``None`` or empty options: as it is)."""
    if options is None or (not options and options.max_tokens is None):
        return config
    configurable = {**config.get("configurable", {}), OPTIONS_KEY: options}
    return {**config, "configurable": configurable}


def options_of(config: RunnableConfig | None) -> ModelOptions | None:
    """The options a call's config carries, or ``None``."""
    options = (config or {}).get("configurable", {}).get(OPTIONS_KEY)
    return options if isinstance(options, ModelOptions) else None


def check_reply(options: ModelOptions, reply: BaseMessage) -> None:
    """Raise `StructuredReplyError` if ``reply`` does not fit the options' JSON schema.

    A reply that calls tools is not checked (its text is not the answer yet); without a
    ``json_schema`` nothing is checked.
    """
    schema = options.schema
    if schema is None or (isinstance(reply, AIMessage) and reply.tool_calls):
        return
    from jsonschema import validators

    text = reply.text
    refusal = reply.additional_kwargs.get("refusal")
    shown = text if len(text) <= 200 else text[:200] + "..."
    if refusal:
        problem = f"the model refused: {refusal!s}"
    else:
        try:
            value = json.loads(text)
        except ValueError:
            problem = "the reply is not JSON"
        else:
            errors = sorted(validators.validator_for(schema)(schema).iter_errors(value), key=str)
            if not errors:
                return
            problem = "; ".join(
                f"{'.'.join(map(str, error.absolute_path)) or 'the reply'}: {error.message}"
                for error in errors[:3]
            )
    cut = reply.response_metadata.get("finish_reason") == "length"
    why = " It was cut short by max_tokens." if cut else " Try again, or loosen the schema."
    raise StructuredReplyError(
        f"The reply does not fit the response_format's JSON schema ({problem}); the model "
        f"answered {shown!r}. Nothing was stored; the call was metered.{why}",
        schema=dict(schema),
        text=text,
    )


def pending_calls(
    history: Sequence[BaseMessage], inputs: Sequence[BaseMessage]
) -> AIMessage | None:
    """The session's AI message whose tool calls ``inputs`` answer, or ``None`` when the
    turn's input is not tool results only.

    Raises:
        InvalidInputError: The results do not answer every call of the session's last
            message (an AI message with ``tool_calls``), each once.
    """
    if not inputs or not all(isinstance(m, ToolMessage) for m in inputs):
        return None  # (a user's message, or a whole conversation sent as it is)
    last = history[-1] if history else None
    calls = [str(c.get("id")) for c in last.tool_calls] if isinstance(last, AIMessage) else []
    if not calls:
        raise InvalidInputError(
            "Tool results were sent, but the session's last message asks for no tool: send "
            "results only right after a reply with tool_calls (or a user message instead)."
        )
    answered = [str(m.tool_call_id) for m in inputs if isinstance(m, ToolMessage)]
    if sorted(answered) != sorted(calls):
        raise InvalidInputError(
            f"The tool results answer the calls {sorted(answered)}, but the session's last "
            f"reply made the calls {sorted(calls)}: send one result (tool_call_id) for each "
            "call, and no other."
        )
    assert isinstance(last, AIMessage)
    return last


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call as it streams (what `ReplyStream.events` yields for the
    client's tools): OpenAI's ``delta.tool_calls[i]``.

    Attributes:
        index: Which call of the reply the piece belongs to (0, 1, ...).
        id: The call's id (on its first piece), else ``None``.
        name: The function's name (on its first piece), else ``None``.
        arguments: The next part of the arguments' JSON text (may be empty).
    """

    index: int
    id: str | None
    name: str | None
    arguments: str


def deltas_of(chunk: object) -> list[ToolCallDelta]:
    """The tool-call pieces a streamed chunk carries (none for other items)."""
    if not isinstance(chunk, AIMessageChunk) or not chunk.tool_call_chunks:
        return []
    return [
        ToolCallDelta(
            index=int(piece.get("index") or 0),
            id=piece.get("id"),
            name=piece.get("name"),
            arguments=piece.get("args") or "",
        )
        for piece in chunk.tool_call_chunks
    ]
