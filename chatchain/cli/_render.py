"""How the terminal shows replies, usage, sessions and transcripts (with rich).

Text from people and models is always printed as is: never read as rich markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from rich.console import Console
from rich.table import Table
from rich.text import Text

from chatchain import Usage, UsageReport
from chatchain._money import format_usd
from chatchain.stores import SessionInfo
from chatchain.usage import estimated_note
from chatchain.users import User

_SPEAKERS = {"human": ("you", "bold cyan"), "ai": ("assistant", "bold green")}


def stdout_console() -> Console:
    """Rich's console on stdout; on a pipe or a file, tables keep their natural width."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 1000
    return console


def count(number: int, noun: str) -> str:
    """``number`` and ``noun``, plural unless it is 1.

    Example:
        >>> count(1, "turn"), count(2, "session")
        ('1 turn', '2 sessions')
    """
    return f"{number} {noun}{'' if number == 1 else 's'}"


def usage_line(usage: Usage, session_id: str | None = None) -> Text:
    """The dim line after a reply: tokens, cost (never a silent $0), latency, first token.

    Tokens the endpoint did not report (counted here) read ``~N tokens (...), estimated``;
    a reply from the response cache reads ``cached`` and what it saved.

    Example:
        >>> usage = Usage(prompt_tokens=15, completion_tokens=8, total_tokens=23, cost_usd=None,
        ...               latency_s=0.412, first_token_s=0.1)
        >>> usage_line(usage).plain
        '23 tokens (15 prompt + 8 completion), cost unknown, 0.41 s, first token 0.10 s'
        >>> usage_line(Usage(prompt_tokens=15, completion_tokens=8, total_tokens=23,
        ...                  cost_usd=0.00002, estimated=1)).plain
        '~23 tokens (15 prompt + 8 completion), estimated, ~$0.000020, 0.00 s'
        >>> usage_line(Usage(turns=1, cached_turns=1, saved_usd=0.00002, latency_s=0.01)).plain
        'cached, saved $0.000020, 0 tokens (0 prompt + 0 completion), $0.00, 0.01 s'
    """
    line = usage.line if session_id is None else f"session {session_id}, {usage.line}"
    return Text(line, style="dim")


def notices(console: Console, texts: Sequence[str]) -> None:
    """What the library says the user should know about a turn, one line each."""
    for text in texts:
        console.print(Text(f"note: {text}", style="yellow"), soft_wrap=True)


def _when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def sessions_table(infos: Sequence[SessionInfo], current: str | None = None) -> Table:
    """The sessions as a table: id, messages, created, updated (local time)."""
    table = Table(
        "session", "messages", "created", "updated", box=None, header_style="bold", pad_edge=False
    )
    table.columns[1].justify = "right"
    for info in infos:
        mark = " *" if info.session_id == current else ""
        table.add_row(
            Text(info.session_id + mark),
            str(info.message_count),
            _when(info.created_at),
            _when(info.updated_at),
        )
    return table


def _short(text: str, most: int) -> str:
    text = " ".join(text.split())  # one line, whatever the tool returned
    return text if len(text) <= most else text[: most - 1] + "…"


def tool_call_line(name: str, args: dict[str, object]) -> Text:
    """The dim line of a tool call in a transcript: its name and (short) arguments.

    Example:
        >>> tool_call_line("get_weather", {"city": "Oslo"}).plain
        "  tool get_weather(city='Oslo')"
    """
    shown = ", ".join(f"{key}={value!r}" for key, value in args.items())
    return Text(f"  tool {name}({_short(shown, 60)})", style="dim")


def tool_result_line(message: ToolMessage, name: str | None = None) -> Text:
    """The dim line of a tool's result in a transcript: ``→`` the result, or its error.

    Example:
        >>> from langchain_core.messages import ToolMessage
        >>> tool_result_line(ToolMessage("sunny,\\n21 C", tool_call_id="c1"), "get_weather").plain
        '  → get_weather: sunny, 21 C'
        >>> tool_result_line(ToolMessage("no such city", tool_call_id="c1", status="error")).plain
        '  → error: no such city'
    """
    label = "error" if message.status == "error" else (message.name or name)
    prefix = f"{label}: " if label else ""
    return Text(f"  → {prefix}{_short(message.text, 100)}", style="dim")


def _usd(cap: float | None) -> str:
    return "-" if cap is None else format_usd(cap)


def _rate(limit: int | None) -> str:
    """A user's own rate limit: ``default`` (the deployment's), ``unlimited`` or the number."""
    if limit is None:
        return "default"
    return "unlimited" if limit == 0 else str(limit)


def users_table(users: Sequence[User]) -> Table:
    """The users as a table: name, created (local time), caps in USD, their own rate limits
    and status; never a token or its hash."""
    table = Table(
        "user",
        "created",
        "budget",
        "daily",
        "monthly",
        "req/min",
        "streams",
        "status",
        box=None,
        header_style="bold",
        pad_edge=False,
    )
    for column in table.columns[2:7]:
        column.justify = "right"
    for user in users:
        table.add_row(
            Text(user.name),
            _when(user.created_at),
            _usd(user.budget_usd),
            _usd(user.daily_usd),
            _usd(user.monthly_usd),
            _rate(user.requests_per_minute),
            _rate(user.streams),
            "revoked" if user.revoked else "active",
        )
    return table


def caps_line(user: User) -> str:
    """A user's caps and own rate limits in one line: ``alice: budget $5.00, daily $1.00,
    monthly -, requests per minute 20, streams default``."""
    caps = (("budget", user.budget_usd), ("daily", user.daily_usd), ("monthly", user.monthly_usd))
    rates = (("requests per minute", user.requests_per_minute), ("streams", user.streams))
    return f"{user.name}: " + ", ".join(
        [f"{name} {_usd(cap)}" for name, cap in caps]
        + [f"{name} {_rate(limit)}" for name, limit in rates]
    )


def transcript(console: Console, messages: Sequence[BaseMessage]) -> None:
    """A session's messages, one speaker label each; interrupted replies are marked.

    Tool calls and their results show as dim lines under the reply that made them.
    """
    names: dict[str, str] = {}  # tool call id -> tool name, to label the results
    for message in messages:
        if isinstance(message, ToolMessage):
            console.print(tool_result_line(message, names.get(message.tool_call_id)))
            continue
        calls = message.tool_calls if isinstance(message, AIMessage) else []
        if message.text or not calls:
            name, style = _SPEAKERS.get(message.type, (message.type, "bold"))
            line = Text.assemble((f"{name}: ", style), message.text)
            if message.response_metadata.get("interrupted"):
                line.append(" (interrupted)", style="yellow")
            console.print(line, soft_wrap=True)
        for call in calls:
            names[str(call.get("id"))] = call["name"]
            console.print(tool_call_line(call["name"], call["args"]), soft_wrap=True)


def _cost(cost: float | None) -> str:
    return "unknown" if cost is None else format_usd(cost)


def usage_note(report: UsageReport) -> Text | None:
    """The line under a usage table that explains its ``~``, if it has one."""
    if not report.total.estimated:
        return None
    return Text(estimated_note(report.total.estimated), style="dim")


def _tokens(prompt: int, completion: int, total: int, estimated: int) -> list[str]:
    mark = "~" if estimated else ""
    return [f"{mark}{number:,}" for number in (prompt, completion, total)]


def usage_table(report: UsageReport) -> Table:
    """A usage report's rows and its total as a table; an unknown cost reads ``unknown``.

    Totals that include estimated tokens are marked ``~`` (see `usage_note`). When the
    response cache answered any turn, columns ``cached`` (turns) and ``saved`` (USD) follow.
    """
    total = report.total
    hits = bool(total.cached_turns)
    numbers = ["turns", "summaries", "prompt", "completion", "total", "cost"]
    numbers += ["cached", "saved"] if hits else []
    table = Table(*report.by, box=None, header_style="bold", show_footer=True, pad_edge=False)
    for name in numbers:
        table.add_column(name, justify="right")
    for row in report.rows:
        table.add_row(
            *(Text(str(row[key])) for key in report.by),
            str(row["turns"]),
            str(row["summaries"]),
            *_tokens(
                row["prompt_tokens"],
                row["completion_tokens"],
                row["total_tokens"],
                row["estimated"],
            ),
            _cost(row["cost_usd"]),
            *((str(row["cached_turns"]), _cost(row["saved_usd"])) if hits else ()),
        )
    footers = [
        "TOTAL",
        *([""] * (len(report.by) - 1)),
        str(total.turns),
        str(total.summaries),
        *_tokens(total.prompt_tokens, total.completion_tokens, total.total_tokens, total.estimated),
        _cost(total.cost_usd),
        *((str(total.cached_turns), _cost(total.saved_usd)) if hits else ()),
    ]
    for column, footer in zip(table.columns, footers, strict=True):
        column.footer = footer
    return table
