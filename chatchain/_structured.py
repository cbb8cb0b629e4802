"""Structured replies: a turn whose answer is a validated pydantic instance.

``bot.chat(text, schema=Model)`` (and `ChatChain.with_structured_output`) run an ordinary
turn, except that the model step asks for the schema with LangChain's
``with_structured_output``: method ``json_schema`` (OpenAI's structured outputs) first, and
``function_calling`` when the endpoint refuses ``response_format`` of type ``json_schema`` (a
400 naming ``response_format``, as OpenAI's older models and many compatible servers answer);
the refusal is remembered per chain, so later turns go straight to function calling. An
endpoint that refuses the forced tool call too is reported with both refusals (see
`chatchain._endpoint_errors.SchemaRefused`). Models
without a ``method`` choice (e.g. `FakeChatModel`) use their own ``with_structured_output``.

The reply is stored as the instance's JSON text, so later turns see what was answered, and
the instance is the turn's ``parsed``. A reply that does not validate raises
`StructuredReplyError`: its call is metered (the endpoint billed it), nothing is stored. A
structured turn does not call tools.

The model step also sends a call's own `ModelOptions` (the client's tools, ``tool_choice``,
``response_format``; see `chatchain._options`): the model is called once with them, without
the chain's tools, and a reply that does not fit a ``json_schema`` is metered, then refused,
as above. Streamed with a ``json_schema``, the reply is asked for whole, checked, then sent.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import openai
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.base import RunnableBindingBase
from langchain_core.runnables.fallbacks import RunnableWithFallbacks
from langchain_core.utils.function_calling import convert_to_openai_function
from pydantic import BaseModel, ValidationError

from chatchain import _cache, _endpoint_errors, _streaming
from chatchain._flow import Flow, arun, call, run
from chatchain._options import ModelOptions, check_reply, options_of
from chatchain.errors import InvalidInputError, StructuredReplyError

__all__ = [
    "SCHEMA_KEY",
    "StructuredChain",
    "StructuredModel",
    "check_schema",
    "refuses_json_schema",
    "schema_of",
    "with_schema",
]

logger = logging.getLogger("chatchain")

SCHEMA_KEY = "__chatchain_schema"
"""Where a run's configurable carries the schema of a structured turn (``__``: not traced)."""

# langchain-openai warns when it sees OpenAI's refusal of json_schema, or a model name it
# knows has no structured outputs, and tells the user to pick function calling: chatchain does
# that itself, so the warning is not one the user can act on.
_FALLBACK_WARNINGS = (
    r"This model does not support OpenAI's structured output feature",
    r"Cannot use method='json_schema' with model",
)


def check_schema(schema: object) -> type[BaseModel]:
    """``schema`` if it is a pydantic model class, else a clear error.

    Raises:
        InvalidInputError: ``schema`` is not a pydantic model class.
    """
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema
    raise InvalidInputError(
        f"schema must be a pydantic model class (class Answer(BaseModel): ...), not "
        f"{schema!r}: chatchain validates the reply into an instance of it."
    )


def with_schema(config: RunnableConfig | None, schema: type[BaseModel] | None) -> RunnableConfig:
    """``config`` asking for a structured reply of ``schema`` (``None``: as it is)."""
    base: RunnableConfig = config or {}
    if schema is None:
        return base
    configurable = {**base.get("configurable", {}), SCHEMA_KEY: check_schema(schema)}
    return {**base, "configurable": configurable}


def schema_of(config: RunnableConfig | None) -> type[BaseModel] | None:
    """The schema a structured turn's config asks for, or ``None``; its JSON schema is
    sent with the call (as ``response_format`` or a forced tool), so it counts as prompt."""
    schema = (config or {}).get("configurable", {}).get(SCHEMA_KEY)
    return schema if isinstance(schema, type) else None


def _turn_of(config: RunnableConfig | None) -> Any:
    from chatchain._turn import TURN_KEY

    return (config or {}).get("configurable", {}).get(TURN_KEY)


def refuses_json_schema(exc: BaseException) -> bool:
    """Whether ``exc`` is the endpoint refusing ``response_format`` (json_schema) itself.

    OpenAI answers 400 ``"Invalid parameter: 'response_format' of type 'json_schema' is not
    supported with this model"`` (param ``response_format``), or ``"Invalid schema for
    response_format ..."`` for a schema its structured outputs cannot take; compatible servers
    answer 400 or 422 naming ``response_format`` or ``json_schema``. Any other error (a
    context overflow, a bad key) is not a refusal and is not retried.
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, openai.APIStatusError) and link.status_code in (400, 422):
            body: Mapping[str, Any] = link.body if isinstance(link.body, Mapping) else {}
            inner = body.get("error")
            error: Mapping[str, Any] = inner if isinstance(inner, Mapping) else body
            text = f"{link.message} {error.get('message', '')}".lower()
            return error.get("param") == "response_format" or (
                "response_format" in text or "json_schema" in text
            )
        link = link.__cause__ or link.__context__
    return False


@contextmanager
def _quiet_fallback_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _FALLBACK_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def _with_max_tokens(model: Runnable[Any, Any], limit: int | None) -> Runnable[Any, Any]:
    """``model`` sending ``max_tokens=limit`` (the turn's budget hold), as a copy."""
    if limit is None:
        return model
    if isinstance(model, RunnableWithFallbacks):
        return model.model_copy(
            update={
                "runnable": _with_max_tokens(model.runnable, limit),
                "fallbacks": [_with_max_tokens(f, limit) for f in model.fallbacks],
            }
        )
    if isinstance(model, BaseChatModel) and "max_tokens" in type(model).model_fields:
        return model.model_copy(update={"max_tokens": limit})
    if isinstance(model, RunnableBindingBase):  # the response cache's wrapper, say
        return model.model_copy(update={"bound": _with_max_tokens(model.bound, limit)})
    return model  # pragma: no cover - a model without max_tokens cannot be capped per call


def _takes_method(model: Runnable[Any, Any]) -> bool:
    model = getattr(model, "runnable", model)  # the main model of a RunnableWithFallbacks
    method = getattr(model, "with_structured_output", None)
    return method is not None and "method" in inspect.signature(method).parameters


def _reply_text(raw: BaseMessage) -> str:
    """What the model answered: the forced tool call's arguments, or the text."""
    calls = getattr(raw, "tool_calls", None) or []
    if calls:
        return json.dumps(calls[0].get("args", {}))
    return raw.text if isinstance(raw.text, str) else str(raw.content)


def _validated(schema: type[BaseModel], output: Mapping[str, Any]) -> BaseModel:
    """The reply as an instance of ``schema``, or `StructuredReplyError`."""
    parsed = output.get("parsed")
    if isinstance(parsed, schema):
        return parsed
    raw = output["raw"]
    text = _reply_text(raw)
    name = schema.__name__
    refusal = raw.additional_kwargs.get("refusal")
    if refusal:
        raise StructuredReplyError(
            f"The model refused to answer in the {name} schema: {refusal!s}. Nothing was "
            "stored. Rephrase the question.",
            schema=schema,
            text=text,
        )
    try:
        return schema.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'the reply'}: {error['msg']}"
            for error in exc.errors()[:3]
        )
    cut = raw.response_metadata.get("finish_reason") == "length"
    why = (
        " The reply was cut short by max_tokens: raise CHATCHAIN_MAX_TOKENS."
        if cut
        else " Try again, or loosen the schema (defaults, optional fields) and describe its "
        "fields (Field(description=...))."
    )
    shown = text if len(text) <= 200 else text[:200] + "..."
    raise StructuredReplyError(
        f"The reply does not fit the {name} schema ({problems}); the model answered "
        f"{shown!r}. Nothing was stored; the call was metered.{why}",
        schema=schema,
        text=text,
    )


def _reply_message(parsed: BaseModel, raw: BaseMessage) -> AIMessage:
    """The reply as stored: the instance's JSON text, with the raw reply's metadata."""
    return AIMessage(
        content=parsed.model_dump_json(),
        id=raw.id,
        response_metadata=dict(raw.response_metadata),
        usage_metadata=getattr(raw, "usage_metadata", None),
    )


class StructuredModel(Runnable[Any, Any]):
    """The chain's model step; for a structured turn, the model's ``with_structured_output``.

    Attributes:
        step: The usual model step (the model, budgeted or with tools), for other turns.
        model: The chat model, whose ``with_structured_output`` structured turns use.
    """

    def __init__(self, step: Runnable[Any, Any], model: Runnable[Any, Any]) -> None:
        self.step = step
        self.model = model
        self.json_schema_refused = False
        """The endpoint refused json_schema once: structured turns use function calling."""
        self.json_schema_refusal = ""
        """What the endpoint said when it refused json_schema, to report with a refusal of
        function calling."""

    def _methods(self) -> list[str | None]:
        if not _takes_method(self.model):
            return [None]
        return (
            ["function_calling"]
            if self.json_schema_refused
            else ["json_schema", "function_calling"]
        )

    def _structured(
        self, schema: type[BaseModel], method: str | None, turn: Any
    ) -> Runnable[Any, Any]:
        model: Any = _with_max_tokens(self.model, getattr(turn, "reply_limit", None))
        model = _cache.cache_off(model)  # never LangChain's global cache (see chatchain._cache)
        options: dict[str, Any] = {"include_raw": True}
        target: Any = schema
        if method is not None:
            options["method"] = method
        if method == "json_schema":
            # As a JSON schema, not the class: given the class, the openai client validates
            # the reply inside the call, and a reply that does not fit then loses its usage
            # and its text. chatchain validates it afterwards (`_validated`).
            target = convert_to_openai_function(schema)
        runnable: Runnable[Any, Any] = model.with_structured_output(target, **options)
        return runnable

    def _refused(self, exc: Exception, method: str | None) -> bool:
        if method != "json_schema" or not refuses_json_schema(exc):
            return False
        self.json_schema_refused = True
        self.json_schema_refusal = _endpoint_errors.describe(exc)
        logger.info(
            "The endpoint refused response_format json_schema; structured replies use "
            "function calling from now on."
        )
        return True

    def _answer(self, schema: type[BaseModel], output: Mapping[str, Any], turn: Any) -> AIMessage:
        parsed = _validated(schema, output)
        if turn is not None:
            turn.parsed = parsed
        return _reply_message(parsed, output["raw"])

    def _run(self, input: Any, config: RunnableConfig | None, schema: type[BaseModel]) -> AIMessage:
        return run(self._run_flow(input, config, schema))

    async def _arun(
        self, input: Any, config: RunnableConfig | None, schema: type[BaseModel]
    ) -> AIMessage:
        return await arun(self._run_flow(input, config, schema))

    def _run_flow(
        self, input: Any, config: RunnableConfig | None, schema: type[BaseModel]
    ) -> Flow[AIMessage]:
        """The structured call: json_schema, else function calling for an endpoint that
        refuses it; a reply that does not fit is metered (billed), then refused."""
        turn = _turn_of(config)
        for method in self._methods():
            try:
                with _quiet_fallback_warnings():
                    structured = self._structured(schema, method, turn)
                    output = yield call(structured, "invoke", input, config)
            except Exception as exc:
                if self._refused(exc, method):
                    continue
                if self.json_schema_refused and _endpoint_errors.is_refusal(exc):
                    # Both ways refused (function calling is the last): say both.
                    raise _endpoint_errors.SchemaRefused(self.json_schema_refusal, exc) from exc
                raise
            try:
                return self._answer(schema, output, turn)
            except StructuredReplyError:
                if turn is not None:
                    yield from turn.meter_only_flow(output["raw"])
                raise
        raise AssertionError("unreachable: function calling is always tried")  # pragma: no cover

    # -- a call's own options (the client's tools and response format) ---------------------

    def _with_options(self, options: ModelOptions) -> Runnable[Any, Any]:
        """The model sent ``options``, its call held like any (never cached: the cache's key
        does not know the client's tools)."""
        from chatchain._turn_money import BudgetedModel

        return BudgetedModel(options.bind(_cache.cache_off(self.model)))

    def _options_flow(
        self, input: Any, config: RunnableConfig | None, options: ModelOptions
    ) -> Flow[Any]:
        """One call with ``options``; a reply that does not fit their JSON schema is metered
        (billed), then refused."""
        reply = yield call(self._with_options(options), "invoke", input, config)
        try:
            check_reply(options, reply)
        except StructuredReplyError:
            turn = _turn_of(config)
            if turn is not None:
                yield from turn.meter_only_flow(reply)
            raise
        return reply

    def _streamed_options(self, options: ModelOptions) -> Runnable[Any, Any] | None:
        """The model to stream a call with ``options`` from, or ``None`` when the reply must
        be checked whole before it is sent (a ``json_schema``)."""
        return None if options.schema is not None else self._with_options(options)

    # -- the runnable -------------------------------------------------------------------------

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        schema = schema_of(config)
        if schema is not None:
            return self._run(input, config, schema)
        options = options_of(config)
        if options:  # tools or a format (max_tokens alone: the usual step)
            return run(self._options_flow(input, config, options))
        return self.step.invoke(input, config, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        schema = schema_of(config)
        if schema is not None:
            return await self._arun(input, config, schema)
        options = options_of(config)
        if options:  # tools or a format (max_tokens alone: the usual step)
            return await arun(self._options_flow(input, config, options))
        return await self.step.ainvoke(input, config, **kwargs)

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        schema = schema_of(config)
        if schema is not None:
            yield _as_chunk(self._run(input, config, schema))  # validated whole, then sent
            return
        step = self.step
        options = options_of(config)
        if options:  # tools or a format (max_tokens alone: the usual step)
            with_options = self._streamed_options(options)
            if with_options is None:
                yield _as_chunk(run(self._options_flow(input, config, options)))
                return
            step = with_options
        chunks = step.stream(input, config, **kwargs)
        # In a turn, relayed: the chain's runnables then keep no chunk (see `Relay`).
        yield from chunks if _turn_of(config) is None else _streaming.relayed(chunks)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        schema = schema_of(config)
        if schema is None:
            step = self.step
            options = options_of(config)
            if options:  # tools or a format (max_tokens alone: the usual step)
                with_options = self._streamed_options(options)
                if with_options is None:
                    yield _as_chunk(await arun(self._options_flow(input, config, options)))
                    return
                step = with_options
            chunks = step.astream(input, config, **kwargs)
            if _turn_of(config) is not None:
                chunks = _streaming.arelayed(chunks)
            async for chunk in chunks:
                yield chunk
            return
        yield _as_chunk(await self._arun(input, config, schema))


def _as_chunk(message: AIMessage) -> AIMessageChunk:
    """A whole reply as one chunk (its tool calls as whole pieces)."""
    calls = [
        tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c.get("id"), index=i)
        for i, c in enumerate(message.tool_calls)
    ]
    return AIMessageChunk(
        content=message.content,
        id=message.id,
        response_metadata=message.response_metadata,
        usage_metadata=message.usage_metadata,
        tool_call_chunks=calls,
    )


class StructuredChain(Runnable[Any, Any]):
    """A chat chain whose turns answer with an instance of ``schema`` (see the module).

    Made by `ChatChain.with_structured_output`; called like the chain (same input and
    config), it returns the validated instance. The turn is stored and metered as usual.
    """

    def __init__(self, chain: Any, schema: type[BaseModel]) -> None:
        self.chain = chain
        self.schema = check_schema(schema)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        _, turn = self.chain.run_turn(input, with_schema(config, self.schema), **kwargs)
        return turn.parsed

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        _, turn = await self.chain.arun_turn(input, with_schema(config, self.schema), **kwargs)
        return turn.parsed
