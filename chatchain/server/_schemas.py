"""The JSON shapes of the native API (request bodies refuse unknown fields)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chatchain import ToolRun, Usage

__all__ = [
    "BudgetLeftOut",
    "MeOut",
    "MessageIn",
    "MessageOut",
    "Messages",
    "ReplyOut",
    "SessionOut",
    "Sessions",
    "TitleIn",
    "ToolCallOut",
    "ToolRequestOut",
    "UsageOut",
    "UsageReportOut",
    "tool_call_out",
    "usage_out",
]


class MessageIn(BaseModel):
    """One turn: the user's text and values of the system prompt's ``{variables}``."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="The user's message.")
    vars: dict[str, str] = Field(
        default_factory=dict, description="Values of the system prompt's {variables}."
    )
    replace_last: bool = Field(
        default=False,
        description="Replace the session's last turn (its last user message and the reply) "
        "with this one: regenerate, or edit and resend. The replaced turn stays in the usage "
        "ledger; if this turn is refused, the last turn is put back.",
    )


class UsageOut(BaseModel):
    """Tokens and cost of a turn (or a total); ``line`` is the terminal chat's usage line."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None = Field(description="None when the model's price is unknown.")
    estimated: bool = Field(description="The endpoint did not report the tokens: counted here.")
    line: str


def usage_out(usage: Usage) -> UsageOut:
    """The JSON of ``usage``."""
    return UsageOut(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cost_usd=usage.cost_usd,
        estimated=bool(usage.estimated),
        line=usage.line,
    )


class ToolCallOut(BaseModel):
    """One tool call of a turn, and how it went: a `ToolRun` as JSON.

    The HTTP API keeps its first names (``tool_calls``, ``ToolCallOut``), which clients read,
    where the library now says ``tool_runs``/`ToolRun`.
    """

    id: str = Field(description="The call's id.")
    name: str = Field(description="The tool the model asked for.")
    args: dict[str, Any] = Field(description="The arguments it gave.")
    result: str = Field(description="What was sent back to the model (the error text if failed).")
    status: Literal["success", "error"]
    error: str | None = Field(description="What went wrong, or None.")
    seconds: float = Field(description="How long the tool ran.")


def tool_call_out(run: ToolRun) -> ToolCallOut:
    """The JSON of ``run``."""
    return ToolCallOut(
        id=run.id,
        name=run.name,
        args=run.args,
        result=run.result,
        status=run.status,
        error=run.error,
        seconds=run.seconds,
    )


class ReplyOut(BaseModel):
    """The reply to a turn."""

    session_id: str
    text: str
    interrupted: bool
    notices: list[str]
    usage: UsageOut
    tool_calls: list[ToolCallOut] = Field(
        default_factory=list,
        description="The tools the server ran in the turn, in order (none without --tools).",
    )


class SessionOut(BaseModel):
    session_id: str
    title: str = Field(
        description="The title given to the session, else the start of its first message."
    )
    message_count: int
    created_at: datetime
    updated_at: datetime


class TitleIn(BaseModel):
    """A session's new title; an empty one gives the session back its first message's."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(max_length=200, description="The title (200 characters at most).")


class Sessions(BaseModel):
    sessions: list[SessionOut] = Field(
        description="The caller's sessions, newest first: at most the newest 500."
    )


class ToolRequestOut(BaseModel):
    """A tool call an assistant message asked for (its result is the tool message after it)."""

    id: str
    name: str
    args: dict[str, Any]


class MessageOut(BaseModel):
    """One message of a transcript; the tool fields are left out of messages without them."""

    role: Literal["user", "assistant", "system", "tool"]
    text: str
    interrupted: bool
    tool_calls: list[ToolRequestOut] | None = Field(
        default=None, description="An assistant message's tool calls (left out when none)."
    )
    name: str | None = Field(default=None, description="A tool message's tool.")
    tool_call_id: str | None = Field(
        default=None, description="The call a tool message answers (an id of tool_calls)."
    )
    status: Literal["success", "error"] | None = Field(
        default=None, description="How a tool message's call went."
    )
    usage: UsageOut | None = Field(
        default=None,
        description="A reply's tokens and cost, as the endpoint reported them (left out when "
        "it did not); its line has no timings.",
    )


class BudgetLeftOut(BaseModel):
    """The tightest of the caller's caps: what is left of it, in USD."""

    cap: str = Field(description="Which cap: budget, daily cap or monthly cap.")
    max_usd: float
    left_usd: float = Field(description="What is left (never below 0).")
    line: str = Field(
        description="For people: `$0.79 left of your daily cap of $1.00 ($0.21 spent)`."
    )


class LimitsOut(BaseModel):
    """The rate limits that apply to the caller: their own, or the deployment's."""

    requests_per_minute: int = Field(description="Requests in any 60 s; 0 for no limit.")
    streams: int = Field(description="Streamed replies open at once; 0 for no limit.")


class MeOut(BaseModel):
    """Who the caller is, the model that answers, the budget left (the page's header) and the
    rate limits that apply."""

    user: str
    model: str
    budget: BudgetLeftOut | None = Field(description="None when the caller has no USD cap.")
    limits: LimitsOut


class Messages(BaseModel):
    session_id: str
    messages: list[MessageOut] = Field(description="The whole transcript, oldest first.")


class UsageReportOut(BaseModel):
    total: UsageOut
    rows: list[dict[str, Any]] = Field(
        description="Totals by session (the caller's ids), model and day, as the CLI's report."
    )
