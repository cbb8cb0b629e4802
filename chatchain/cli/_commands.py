"""The ``chatchain`` commands: chat, ask, sessions, usage, users and demo (click)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast, get_args

import click
from rich.console import Console

from chatchain import (
    Chatbot,
    InvalidInputError,
    SessionExistsError,
    ToolFinished,
    UnknownUserError,
    _demo,
)
from chatchain.cli._chat import ChatLoop, line_reader, stream_reply
from chatchain.cli._render import (
    caps_line,
    count,
    notices,
    sessions_table,
    stdout_console,
    transcript,
    usage_line,
    usage_note,
    usage_table,
    users_table,
)
from chatchain.cli._serve import serve
from chatchain.cli._setup import (
    DATA_DIR_ENV,
    data_dir,
    errors_reported,
    latest_session,
    load_settings,
    new_session_id,
    open_settings_store,
    session_infos,
    store_bot,
    use_endpoint,
)
from chatchain.cli._tools import TOOLS_HELP, load_tools, tool_line
from chatchain.stores import SessionInfo
from chatchain.usage import ReportKey
from chatchain.users import Users, validate_name

F = TypeVar("F", bound=Callable[..., Any])


def _prompt_vars(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    prompt_vars = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{value!r} is not NAME=VALUE.")
        prompt_vars[name.strip()] = text
    return prompt_vars


_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def _parse_duration(value: str) -> timedelta | None:
    match = re.fullmatch(r"(\d+)([dhm])", value.strip())
    return None if match is None else timedelta(**{_UNITS[match[2]]: int(match[1])})


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    duration = _parse_duration(value)
    if duration is None:
        raise click.BadParameter(f"{value!r} is not a duration like 30d, 12h or 90m.")
    return duration


def since_time(value: str, now: datetime) -> datetime:
    """The start of the period that ``usage --since VALUE`` names, as of ``now`` (UTC).

    click has no relative dates and no dependency of chatchain parses them, so this small
    parser takes: a duration back from now (``7d``, ``24h``, ``90m``); ``today`` or
    ``yesterday`` (from 00:00 UTC of that day); or a UTC day (``2026-11-01``).

    Raises:
        ValueError: ``value`` is none of these.

    Example:
        >>> now = datetime(2026, 11, 20, 15, 30, tzinfo=UTC)
        >>> since_time("7d", now).isoformat()
        '2026-11-13T15:30:00+00:00'
        >>> since_time("yesterday", now).isoformat()
        '2026-11-19T00:00:00+00:00'
        >>> since_time("2026-11-01", now).isoformat()
        '2026-11-01T00:00:00+00:00'
    """
    text = value.strip().lower()
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    days_back = {"today": 0, "yesterday": 1}
    if text in days_back:
        return midnight - timedelta(days=days_back[text])
    duration = _parse_duration(text)
    if duration is not None:
        return now - duration
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a period: give 7d, 24h, 90m, today, yesterday or a day "
            "like 2026-11-01 (UTC)."
        ) from None


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return since_time(value, datetime.now(UTC))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _report_keys(ctx: click.Context, param: click.Parameter, value: str) -> tuple[ReportKey, ...]:
    keys = tuple(key.strip() for key in value.split(",") if key.strip())
    known = get_args(ReportKey)
    if not keys or any(key not in known for key in keys):
        raise click.BadParameter(f"{value!r}: give a comma-separated list of {', '.join(known)}.")
    return cast("tuple[ReportKey, ...]", keys)


def _options(*options: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator adding ``options`` in the order given (as they are listed in --help)."""

    def decorate(function: F) -> F:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


_store_options = _options(
    click.option(
        "--store",
        "store_url",
        metavar="URL",
        help="Where sessions live: sqlite:///path, redis://..., postgresql://..., memory://, "
        "or an installed store's scheme (default: CHATCHAIN_STORE, else chat.db in the user's "
        "data folder).",
    ),
    click.option(
        "--env-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Read settings from this file instead of ./.env.",
    ),
    click.option(
        "--debug", is_flag=True, help="Show tracebacks and chatchain's log, not one error line."
    ),
)

_model_options = _options(
    click.option(
        "--model", metavar="NAME", help="The model (default: OPENAI_MODEL, else gpt-4o-mini)."
    ),
    click.option("--system", help="The system prompt; may hold {variables}."),
    click.option(
        "--var",
        "prompt_vars",
        metavar="NAME=VALUE",
        multiple=True,
        callback=_prompt_vars,
        help="A value for a {variable} of the system prompt (repeatable).",
    ),
    click.option("--temperature", type=float, help="Sampling temperature, 0 to 2."),
    click.option(
        "--user", metavar="ID", help="File the turns' usage (and budgets) under this user id."
    ),
    click.option("--offline", is_flag=True, help="Talk to chatchain's echo server, not a model."),
    click.option("--tools", "tools_from", metavar="MODULE", help=TOOLS_HELP),
)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=f"Settings come from the environment and .env (see the README). {DATA_DIR_ENV} "
    "moves the user's data folder (default store and input history).",
)
@click.version_option(package_name="chatchain")
def cli() -> None:
    """Chat with an OpenAI-compatible model in the terminal; sessions and costs are kept."""


@cli.command()
@click.option("--session", "session_id", metavar="ID", help="Chat in this session.")
@click.option("--new", is_flag=True, help="Start a new session (default: the latest one).")
@_model_options
@_store_options
def chat(
    session_id: str | None,
    new: bool,
    model: str | None,
    system: str | None,
    prompt_vars: dict[str, str],
    temperature: float | None,
    user: str | None,
    offline: bool,
    tools_from: str | None,
    store_url: str | None,
    env_file: Path | None,
    debug: bool,
) -> None:
    """Chat interactively; replies stream as they arrive.

    Without --session or --new, the chat goes on in the session written most recently (or a
    new one). /help lists the commands; Ctrl-C stops a reply; Ctrl-D leaves. With --tools the
    model may call your tools; each call shows as a dim line (name, arguments, ok or error).
    """
    if session_id is not None and new:
        raise click.UsageError("--session and --new cannot be used together.")
    console = stdout_console()
    with errors_reported(debug) as report:
        loaded = load_settings(
            env_file, {"store_url": store_url, "model": model, "temperature": temperature}
        )
        report.remember_key(loaded)
        tools = load_tools(tools_from) if tools_from else []
        with (
            use_endpoint(loaded, offline, console) as settings,
            closing(open_settings_store(settings)) as history_store,
        ):
            ChatLoop(
                settings=settings,
                store=history_store,
                system=system,
                prompt_vars=prompt_vars,
                user_id=user,
                session_id=new_session_id() if new else session_id,
                read_line=line_reader(data_dir() / "history"),
                console=console,
                report=report,
                tools=tools,
            ).run()


@cli.command()
@click.argument("question")
@click.option(
    "-c",
    "--continue",
    "continue_",
    is_flag=True,
    help="Ask in the session written most recently (a new one if there is none).",
)
@click.option("--session", "session_id", metavar="ID", help="Ask in this session (default: new).")
@_model_options
@_store_options
def ask(
    question: str,
    continue_: bool,
    session_id: str | None,
    model: str | None,
    system: str | None,
    prompt_vars: dict[str, str],
    temperature: float | None,
    user: str | None,
    offline: bool,
    tools_from: str | None,
    store_url: str | None,
    env_file: Path | None,
    debug: bool,
) -> None:
    """Ask one QUESTION ("-" reads it from stdin) and print the reply.

    Each ask starts a new session unless -c/--continue or --session says which to go on
    in. The reply streams when stdout is a terminal, else it is printed whole; the usage line
    (with the session id) goes to stderr. Exit status: 0 on success, 1 on an error, 2 on a
    usage error.
    """
    if session_id is not None and continue_:
        raise click.UsageError("--session and --continue cannot be used together.")
    if question == "-":
        question = sys.stdin.read().strip()
    status = Console(stderr=True, highlight=False)
    with errors_reported(debug) as report:
        loaded = load_settings(
            env_file, {"store_url": store_url, "model": model, "temperature": temperature}
        )
        report.remember_key(loaded)
        tools = load_tools(tools_from) if tools_from else []
        with (
            use_endpoint(loaded, offline, status) as settings,
            Chatbot(settings, system=system, prompt_vars=prompt_vars, tools=tools) as bot,
        ):
            session = session_id or (latest_session(bot) if continue_ else None)
            session = session or new_session_id()
            if not sys.stdout.isatty():
                reply = bot.chat(
                    question,
                    session_id=session,
                    user_id=user,
                    on_tool=lambda e: (
                        status.print(tool_line(e.call), soft_wrap=True)
                        if isinstance(e, ToolFinished)
                        else None
                    ),
                )
                click.echo(reply.text)
                notices(status, reply.notices)
                status.print(usage_line(reply.usage, session), soft_wrap=True)
            elif stream_reply(
                bot,
                question,
                session_id=session,
                user_id=user,
                out=stdout_console(),
                status=status,
                show_session=True,
            ):
                raise click.exceptions.Exit(130)  # interrupted, as by SIGINT


def _no_session(session_id: str, user: str | None = None) -> InvalidInputError:
    if user is not None:
        return InvalidInputError(
            f"User {user} has no session {session_id!r}: see chatchain sessions list --user {user}."
        )
    hint = ""
    if ":" not in session_id:
        hint = " A session made through chatchain serve is USER:ID there; or pass --user USER."
    return InvalidInputError(
        f"There is no session {session_id!r}: see chatchain sessions list.{hint}"
    )


# The chat service keys each user's sessions "USER:ID" in the store it shares with the CLI.
_user_option = click.option(
    "--user",
    metavar="NAME",
    help="A user of chatchain serve: their sessions, by the ids they use (the store keeps "
    "them as NAME:ID).",
)


def _session_key(session_id: str, user: str | None) -> str:
    """The session key of ``session_id``: ``USER:ID`` for a user of the chat service."""
    return session_id if user is None else f"{validate_name(user)}:{session_id}"


@contextmanager
def _managing(store_url: str | None, env_file: Path | None, debug: bool) -> Iterator[Chatbot]:
    with errors_reported(debug) as report:
        settings = load_settings(env_file, {"store_url": store_url})
        report.remember_key(settings)
        with store_bot(settings) as bot:
            yield bot


@cli.group()
def sessions() -> None:
    """List, show, export, import, delete and prune the stored sessions."""


@sessions.command("list")
@_user_option
@_store_options
def list_sessions(
    user: str | None, store_url: str | None, env_file: Path | None, debug: bool
) -> None:
    """The sessions: id, messages, created and updated (local time).

    Sessions made through chatchain serve show as USER:ID; --user USER lists one user's
    sessions alone, by their own ids.
    """
    with _managing(store_url, env_file, debug) as bot:
        infos = session_infos(bot) if user is None else _user_infos(bot, user)
        if not infos:
            click.echo("No sessions yet." if user is None else f"User {user} has no sessions.")
            return
        stdout_console().print(sessions_table(infos))


def _user_infos(bot: Chatbot, user: str) -> list[SessionInfo]:
    """One user's sessions, oldest first, under the ids the user knows them by."""
    prefix = f"{validate_name(user)}:"
    infos = bot.store.session_infos(prefix)
    own = [replace(info, session_id=info.session_id[len(prefix) :]) for info in infos]
    return sorted(own, key=lambda info: info.created_at)


@sessions.command()
@click.argument("session_id", metavar="ID")
@_user_option
@_store_options
def show(
    session_id: str, user: str | None, store_url: str | None, env_file: Path | None, debug: bool
) -> None:
    """The transcript of session ID; interrupted replies are marked."""
    with _managing(store_url, env_file, debug) as bot:
        messages = bot.history(_session_key(session_id, user))
        if not messages:
            raise _no_session(session_id, user)
        transcript(stdout_console(), messages)


@sessions.command()
@click.argument("session_id", metavar="ID")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_user_option
@_store_options
def export(
    session_id: str,
    file: Path,
    user: str | None,
    store_url: str | None,
    env_file: Path | None,
    debug: bool,
) -> None:
    """Write session ID to FILE as JSON (readable by you only)."""
    with _managing(store_url, env_file, debug) as bot:
        if user is not None and bot.session_info(_session_key(session_id, user)) is None:
            raise _no_session(session_id, user)
        data = bot.export_session(_session_key(session_id, user), file)
        click.echo(
            f"Exported session {session_id} ({count(len(data['messages']), 'message')}) to {file}."
        )


@sessions.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--as", "as_id", metavar="ID", help="Store it under this id.")
@click.option("--replace", is_flag=True, help="Overwrite a session of that id.")
@_store_options
def import_(
    file: Path,
    as_id: str | None,
    replace: bool,
    store_url: str | None,
    env_file: Path | None,
    debug: bool,
) -> None:
    """Store the session exported to FILE."""
    with _managing(store_url, env_file, debug) as bot:
        try:
            session_id = bot.import_session(file, session_id=as_id, replace=replace)
        except SessionExistsError as exc:  # the library's advice names Python arguments
            raise SessionExistsError(
                f"Session {exc.session_id!r} exists already: add --replace to overwrite it, "
                "or --as ID to import it under another id.",
                session_id=exc.session_id,
            ) from None
        info = bot.session_info(session_id)
        messages = count(0 if info is None else info.message_count, "message")
        click.echo(f"Imported session {session_id} ({messages}).")


@sessions.command()
@click.argument("session_id", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_user_option
@_store_options
def delete(
    session_id: str,
    yes: bool,
    user: str | None,
    store_url: str | None,
    env_file: Path | None,
    debug: bool,
) -> None:
    """Delete session ID (what it spent stays in the usage ledger)."""
    with _managing(store_url, env_file, debug) as bot:
        key = _session_key(session_id, user)
        info = bot.session_info(key)
        if info is None:
            raise _no_session(session_id, user)
        whose = "" if user is None else f" of user {user}"
        if not yes:
            click.confirm(
                f"Delete session {session_id}{whose} ({count(info.message_count, 'message')})?",
                abort=True,
            )
        bot.delete(key)
        click.echo(f"Deleted session {session_id}{whose}.")


@sessions.command()
@click.option(
    "--older-than",
    "older_than",
    metavar="DURATION",
    callback=_duration,
    required=True,
    help="Idle for longer than this: 30d, 12h or 90m.",
)
@_store_options
def prune(older_than: timedelta, store_url: str | None, env_file: Path | None, debug: bool) -> None:
    """Delete the sessions idle for longer than --older-than."""
    with _managing(store_url, env_file, debug) as bot:
        deleted = bot.prune(older_than)
        which = f": {', '.join(deleted)}" if deleted else "."
        click.echo(f"Deleted {count(len(deleted), 'session')}{which}")


@cli.command()
@click.option(
    "--by",
    metavar="KEYS",
    callback=_report_keys,
    default="session,model,day",
    show_default=True,
    help="Group by any of session, user, model, day.",
)
@click.option("--session", "session_id", metavar="ID", help="Only this session.")
@click.option("--user", "user_id", metavar="ID", help="Only this user.")
@click.option(
    "--since",
    metavar="WHEN",
    callback=_since,
    help="Only the usage since WHEN: 7d, 24h or 90m back from now; today or yesterday "
    "(from 00:00 UTC); or a UTC day, 2026-11-01.",
)
@_store_options
def usage(
    by: tuple[ReportKey, ...],
    session_id: str | None,
    user_id: str | None,
    since: datetime | None,
    store_url: str | None,
    env_file: Path | None,
    debug: bool,
) -> None:
    """What the turns cost: tokens and USD, by session, model and day."""
    with _managing(store_url, env_file, debug) as bot:
        report = bot.usage_report(
            by,
            session_id=session_id,
            user_id=user_id,
            since=since,
        )
        if not report.rows:
            click.echo("No usage recorded.")
            return
        console = stdout_console()
        console.print(usage_table(report))
        note = usage_note(report)
        if note is not None:
            console.print(note, soft_wrap=True)


@contextmanager
def _users(store_url: str | None, env_file: Path | None, debug: bool) -> Iterator[Users]:
    with errors_reported(debug) as report:
        settings = load_settings(env_file, {"store_url": store_url})
        report.remember_key(settings)
        with closing(open_settings_store(settings)) as history_store:
            yield Users(history_store)


_CAPS = {"--budget-usd": "budget_usd", "--daily-usd": "daily_usd", "--monthly-usd": "monthly_usd"}


def _caps_options(none: bool) -> Callable[[F], F]:
    """--budget-usd, --daily-usd and --monthly-usd (``none`` removes a cap, in ``caps``)."""
    remove = " (none removes it)" if none else ""
    helps = {
        "--budget-usd": "The most the user may spend in all, in USD",
        "--daily-usd": "The most the user may spend per UTC day, in USD",
        "--monthly-usd": "The most the user may spend per UTC calendar month, in USD",
    }
    return _options(
        *(
            click.option(flag, metavar="USD", help=text + remove + ".")
            for flag, text in helps.items()
        )
    )


_RATES = {"--requests-per-minute": "requests_per_minute", "--streams": "streams"}


def _rate_options(none: bool) -> Callable[[F], F]:
    """--requests-per-minute and --streams (``none`` gives back the deployment's, in ``caps``)."""
    back = "; none gives back the deployment's" if none else ""
    helps = {
        "--requests-per-minute": "The user's own requests per minute in chatchain serve, "
        "instead of CHATCHAIN_SERVER_REQUESTS_PER_MINUTE (0: no limit",
        "--streams": "The user's own streams open at once in chatchain serve, instead of "
        "CHATCHAIN_SERVER_STREAMS_PER_USER (0: no limit",
    }
    return _options(
        *(click.option(flag, metavar="N", help=text + back + ").") for flag, text in helps.items())
    )


def _rates(given: dict[str, str | None], *, none: bool) -> dict[str, int | None]:
    """The rate limits given on the command line, by `Users` keyword (``none`` -> ``None``).

    Raises:
        InvalidInputError: A value is not a whole number of 0 or more.
    """
    rates: dict[str, int | None] = {}
    for flag, field in _RATES.items():
        value = given[field]
        if value is None:
            continue
        if none and value.strip().lower() == "none":
            rates[field] = None
            continue
        if not value.strip().isdigit():
            back = " (or none for the deployment's)" if none else ""
            raise InvalidInputError(
                f"{flag} {value!r} is not a limit: give a whole number, 0 for no limit{back}."
            )
        rates[field] = int(value)
    return rates


def _usd_caps(given: dict[str, str | None], *, none: bool) -> dict[str, float | None]:
    """The caps given on the command line, by `Users` keyword (``none`` -> ``None``).

    Raises:
        InvalidInputError: A value is not an amount of USD (one line, saying what to give).
    """
    caps: dict[str, float | None] = {}
    for flag, field in _CAPS.items():
        value = given[field]
        if value is None:
            continue
        if none and value.strip().lower() == "none":
            caps[field] = None
            continue
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not 0 <= amount < float("inf"):
            removal = " (or none to remove the cap)" if none else ""
            raise InvalidInputError(
                f"{flag} {value!r} is not an amount of USD: give a number like 1.50{removal}."
            )
        caps[field] = amount
    return caps


@cli.group()
def users() -> None:
    """Add, list, revoke and rotate the users of `chatchain serve`, and set their caps.

    Users live in the store (--store), so every server worker sharing it sees them. A token is
    printed once, when it is made; the store keeps only its hash.
    """


@users.command("add")
@click.argument("name")
@_caps_options(none=False)
@_rate_options(none=False)
@_store_options
def add_user(
    name: str,
    budget_usd: str | None,
    daily_usd: str | None,
    monthly_usd: str | None,
    requests_per_minute: str | None,
    streams: str | None,
    store_url: str | None,
    env_file: Path | None,
    debug: bool,
) -> None:
    """Add a user and print their bearer token (once: keep it, it cannot be shown again)."""
    given = {"budget_usd": budget_usd, "daily_usd": daily_usd, "monthly_usd": monthly_usd}
    rates = {"requests_per_minute": requests_per_minute, "streams": streams}
    with _users(store_url, env_file, debug) as users_:
        limits: dict[str, Any] = {**_usd_caps(given, none=False), **_rates(rates, none=False)}
        token = users_.add(name, **limits)
        click.echo(f"Added user {name}. Their token, shown this once:", err=True)
        click.echo(token)


@users.command("list")
@_store_options
def list_users(store_url: str | None, env_file: Path | None, debug: bool) -> None:
    """The users: name, created (local time), caps and whether revoked."""
    with _users(store_url, env_file, debug) as users_:
        found = users_.list()
        if not found:
            click.echo("No users yet: add one with chatchain users add NAME.")
            return
        stdout_console().print(users_table(found))


@users.command()
@click.argument("name")
@_store_options
def revoke(name: str, store_url: str | None, env_file: Path | None, debug: bool) -> None:
    """Stop a user's token from working (rotate gives them a new one)."""
    with _users(store_url, env_file, debug) as users_:
        users_.revoke(name)
        click.echo(f"Revoked {name}'s token. chatchain users rotate {name} gives them a new one.")


@users.command()
@click.argument("name")
@_store_options
def rotate(name: str, store_url: str | None, env_file: Path | None, debug: bool) -> None:
    """Give a user a new token and print it (the old one stops working; revoked users are
    active again)."""
    with _users(store_url, env_file, debug) as users_:
        token = users_.rotate(name)
        click.echo(
            f"New token for {name} (the old one no longer works), shown this once:", err=True
        )
        click.echo(token)


@users.command()
@click.argument("name")
@_caps_options(none=True)
@_rate_options(none=True)
@_store_options
def caps(
    name: str,
    budget_usd: str | None,
    daily_usd: str | None,
    monthly_usd: str | None,
    requests_per_minute: str | None,
    streams: str | None,
    store_url: str | None,
    env_file: Path | None,
    debug: bool,
) -> None:
    """Show a user's caps and rate limits, or change those given (none removes a cap, or gives
    a rate limit back to the deployment's)."""
    given = {"budget_usd": budget_usd, "daily_usd": daily_usd, "monthly_usd": monthly_usd}
    rates = {"requests_per_minute": requests_per_minute, "streams": streams}
    with _users(store_url, env_file, debug) as users_:
        changes: dict[str, Any] = {**_usd_caps(given, none=True), **_rates(rates, none=True)}
        user = users_.set_caps(name, **changes) if changes else users_.get(name)
        if user is None:
            raise UnknownUserError(
                f"There is no user {name!r}: see chatchain users list, or add them with "
                f"chatchain users add {name}."
            )
        click.echo(caps_line(user))


@cli.command()
def demo() -> None:
    """Run a short scripted chat session and show its tokens and costs.

    It talks to the endpoint of the settings; with no OPENAI_API_KEY and no OPENAI_BASE_URL
    it runs offline against chatchain's own echo server, and says so.
    """
    raise click.exceptions.Exit(_demo.main())


cli.add_command(serve)
