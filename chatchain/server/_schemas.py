"""The JSON shapes of the native API (request bodies refuse unknown fields)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chatchain.usage import Usage

__all__ = [
    "MessageIn",
    "MessageOut",
    "Messages",
    "ReplyOut",
    "SessionOut",
    "Sessions",
    "UsageOut",
    "UsageReportOut",
    "usage_out",
]


class MessageIn(BaseModel):
    """One turn: the user's text and values of the system prompt's ``{variables}``."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="The user's message.")
    vars: dict[str, str] = Field(
        default_factory=dict, description="Values of the system prompt's {variables}."
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


class ReplyOut(BaseModel):
    """The reply to a turn."""

    session_id: str
    text: str
    interrupted: bool
    notices: list[str]
    usage: UsageOut


class SessionOut(BaseModel):
    session_id: str
    message_count: int
    created_at: datetime
    updated_at: datetime


class Sessions(BaseModel):
    sessions: list[SessionOut] = Field(description="The caller's sessions, newest first.")


class MessageOut(BaseModel):
    role: Literal["user", "assistant", "system", "tool"]
    text: str
    interrupted: bool


class Messages(BaseModel):
    session_id: str
    messages: list[MessageOut] = Field(description="The whole transcript, oldest first.")


class UsageReportOut(BaseModel):
    total: UsageOut
    rows: list[dict[str, Any]] = Field(
        description="Totals by session (the caller's ids), model and day, as the CLI's report."
    )
