"""What `OpenAITestServer` answers besides text: tool calls and JSON that fits a schema.

Kept apart from the HTTP plumbing: these are pure functions of the request's JSON, so the
rules are easy to read (and to test) on their own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ScriptedCall", "fit_schema"]


@dataclass(frozen=True)
class ScriptedCall:
    """One tool call the test server makes, as OpenAI's ``tool_calls`` carry it.

    Attributes:
        name: The tool's (function's) name.
        args: The arguments, sent JSON-encoded as ``function.arguments``.
        id: The call id (``tool_call_id`` of its result); ``"call_<random>"`` when ``None``.

    Example:
        >>> ScriptedCall("get_weather", {"city": "Oslo"}).wire(0)["function"]
        {'name': 'get_weather', 'arguments': '{"city": "Oslo"}'}
    """

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ScriptedCall.name must name a tool")
        json.dumps(dict(self.args))  # arguments must be JSON: fail here, not in the server

    def wire(self, index: int, arguments: str | None = None) -> dict[str, Any]:
        """The call in OpenAI's wire format (``arguments`` overrides the encoded ``args``)."""
        call_id = self.id or f"call_{index}_{os.urandom(8).hex()}"
        text = json.dumps(dict(self.args)) if arguments is None else arguments
        return {
            "id": call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": text},
        }


def offered_tools(body: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The request's tools by name: ``{name: the function's JSON schema of parameters}``."""
    tools = body.get("tools")
    offered: dict[str, dict[str, Any]] = {}
    if not isinstance(tools, list):
        return offered
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            offered[function["name"]] = parameters if isinstance(parameters, dict) else {}
    return offered


def forced_tool(body: Mapping[str, Any]) -> str | None:
    """The tool ``tool_choice`` forces (``{"type": "function", "function": {"name": X}}``)."""
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    if choice == "required":
        return next(iter(offered_tools(body)), None)
    return None


def json_schema_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The schema of ``response_format: {"type": "json_schema", ...}``, or ``None``."""
    response_format = body.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else {}


def results_pending(messages: list[Any]) -> bool:
    """Whether the messages since the last user message hold no tool result yet.

    The server's rules call tools only then: once the results are in, the model answers.
    """
    for message in reversed(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            return False
        if role == "user":
            return True
    return True


def fit_schema(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> Any:
    """A value that fits a simple JSON schema: what the server answers when none is queued.

    Objects get every property, strings ``"text"`` (padded to ``minLength``), numbers their
    ``minimum`` (else 0), booleans ``true``, arrays one item (or ``minItems``); ``enum`` and
    ``const`` give their first value, ``anyOf``/``oneOf`` their first choice that is not
    ``null``, and ``$ref`` is followed within the schema. Formats and patterns are not honoured.

    Example:
        >>> fit_schema({"type": "object", "properties": {
        ...     "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1},
        ...     "unit": {"enum": ["C", "F"]},
        ...     "tags": {"type": "array", "items": {"type": "string"}}}})
        {'city': 'text', 'days': 1, 'unit': 'C', 'tags': ['text']}
    """
    root = schema if root is None else root
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return fit_schema(target, root)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        choices = schema.get(key)
        if isinstance(choices, list) and choices:
            usable = [c for c in choices if isinstance(c, dict) and c.get("type") != "null"]
            return fit_schema(usable[0] if usable else choices[0], root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        return {name: fit_schema(sub, root) for name, sub in properties.items()}
    if kind == "array":
        items = schema.get("items")
        items = items if isinstance(items, dict) else {}
        count = max(int(schema.get("minItems", 0)), 1)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        return [fit_schema(items, root) for _ in range(count)]
    if kind == "string":
        return "text".ljust(int(schema.get("minLength", 0)), "x")
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        if "exclusiveMinimum" in schema and "minimum" not in schema:
            low = low + 1
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return True
    return None
