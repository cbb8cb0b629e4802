"""The interactive chat: line editing, streamed replies, slash commands, Ctrl-C and Ctrl-D.

When stdin and stdout are terminals, lines are read with prompt_toolkit: line editing, and an
input history kept in the user's data folder. Otherwise (a pipe, a file, or click's
``CliRunner`` in tests) lines are read plainly from stdin, one message or command per line,
with no prompt shown.

Ctrl-C during a reply closes its stream, so the library keeps the partial reply marked
interrupted, and the chat goes back to the prompt; Ctrl-C at the prompt clears the line;
Ctrl-D (the end of input) leaves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory
from rich.console import Console
from rich.table import Table
from rich.text import Text

from chatchain import Chatbot, Settings, ToolFinished
from chatchain.cli._render import count, notices, sessions_table, transcript, usage_line
from chatchain.cli._setup import (
    ErrorReport,
    latest_session,
    new_session_id,
    session_infos,
)
from chatchain.cli._tools import tool_line
from chatchain.stores import HistoryStore

ReadLine = Callable[[], str]
"""Returns the next line; raises EOFError at the end of input, KeyboardInterrupt on Ctrl-C."""

_PROMPT = "you> "


def line_reader(history: Path) -> ReadLine:
    """prompt_toolkit's prompt on a terminal (input history in ``history``), else stdin's lines."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _read_plain
    # What the user typed is private, like the transcripts: create the file owner-only.
    os.close(os.open(history, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    session: PromptSession[str] = PromptSession(history=FileHistory(history))
    return lambda: session.prompt([("bold", _PROMPT)])


def _read_plain() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


def stream_reply(
    bot: Chatbot,
    text: str,
    *,
    session_id: str,
    user_id: str | None,
    out: Console,
    status: Console,
    show_session: bool = False,
) -> bool:
    """Print the reply as it arrives on ``out``, then its usage line on ``status``.

    ``show_session`` names the session in the usage line. Each tool call the model makes
    shows as a dim line on ``status`` when it ends.

    Ctrl-C closes the stream (the library keeps the partial reply, marked interrupted) and
    prints ``(interrupted)``. Returns whether the reply was interrupted.
    """
    # The pieces go straight to the file: rich's console keeps what it prints in a buffer until
    # written, and a Ctrl-C landing in between would print the piece again with the next line.
    write, flush = out.file.write, out.file.flush
    stream = bot.stream(text, session_id=session_id, user_id=user_id)
    interrupted = False
    line_open = False
    try:
        for event in stream.events():
            if isinstance(event, str):
                write(event)
                flush()
                line_open = True
            elif isinstance(event, ToolFinished):
                if line_open:  # the model said something before calling the tool
                    write("\n")
                    flush()
                    line_open = False
                status.print(tool_line(event.call), soft_wrap=True)
    except KeyboardInterrupt:
        stream.close()
        interrupted = True
    finally:
        if line_open:
            write("\n")  # end the reply's line, before an error line too
            flush()
    if interrupted:
        status.print(Text("(interrupted)", style="yellow"))
    notices(status, stream.notices)
    if stream.usage is not None:
        label = session_id if show_session else None
        status.print(usage_line(stream.usage, label), soft_wrap=True)
    return interrupted


class _UsageProblem(Exception):
    """A slash command was given without its argument."""


_HELP = (
    ("/help", "this list"),
    ("/history", "the session's transcript"),
    ("/usage", "what the session has spent"),
    ("/sessions", "the sessions in the store (* marks this one)"),
    ("/switch ID", "go to session ID (a new one if it has no messages)"),
    ("/system TEXT", "use TEXT as the system prompt for the rest of this chat"),
    ("/save FILE", "export the session to FILE (readable by you only)"),
    ("/delete", "forget the session entirely (what it spent stays in the ledger)"),
    ("/exit", "leave (as Ctrl-D does)"),
)


class ChatLoop:
    """One interactive chat over a store, on one session at a time.

    Args:
        settings: The settings to talk to the model with.
        store: The store; ``/system`` builds a new Chatbot over the same one.
        system: The system prompt (the settings' by default), with ``{variables}``.
        prompt_vars: The values of the system prompt's variables.
        user_id: The user to file the turns' usage under, if any.
        session_id: The session to start on; by default the one written most recently, or a
            new one when the store has none.
        read_line: Where lines come from (see `line_reader`).
        console: Where the chat is shown.
        report: How errors are shown.
        tools: The tools the model may call (``--tools``), or none.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: HistoryStore,
        system: str | None,
        prompt_vars: dict[str, str],
        user_id: str | None,
        session_id: str | None,
        read_line: ReadLine,
        console: Console,
        report: ErrorReport,
        tools: Sequence[Any] = (),
    ) -> None:
        self.settings = settings
        self.tools = list(tools)
        self.store = store
        self.prompt_vars = prompt_vars
        self.user_id = user_id
        self.read_line = read_line
        self.console = console
        self.report = report
        self.bot = self._chatbot(system)
        self.session_id = session_id or latest_session(self.bot) or new_session_id()
        self._commands: dict[str, Callable[[str], None]] = {
            "help": self._help,
            "history": self._history,
            "usage": self._usage,
            "sessions": self._sessions,
            "switch": self._switch,
            "system": self._system,
            "save": self._save,
            "delete": self._delete,
            "reset": self._reset,  # /delete's first name, still understood
        }

    def _chatbot(self, system: str | None) -> Chatbot:
        return Chatbot(
            self.settings,
            store=self.store,
            system=system,
            prompt_vars=self.prompt_vars,
            tools=self.tools,
        )

    def run(self) -> None:
        """Chat until ``/exit`` or the end of input."""
        self._say(f"chatchain, model {self.settings.model}, {self._where()}")
        self._say("/help lists the commands; Ctrl-C stops a reply; Ctrl-D leaves.")
        while True:
            try:
                line = self.read_line().strip()
            except KeyboardInterrupt:
                continue  # prompt_toolkit has cleared the line
            except EOFError:
                return
            if line == "/exit":
                return
            if line:
                self._handle(line)

    def _handle(self, line: str) -> None:
        try:
            if line.startswith("/"):
                name, _, arg = line[1:].partition(" ")
                command = self._commands.get(name)
                if command is None:
                    self._say(f"Unknown command /{name}: /help lists them.")
                else:
                    command(arg.strip())
            else:
                stream_reply(
                    self.bot,
                    line,
                    session_id=self.session_id,
                    user_id=self.user_id,
                    out=self.console,
                    status=self.console,
                )
        except _UsageProblem as problem:
            self._say(f"usage: {problem}")
        except KeyboardInterrupt:
            self.console.print(Text("(interrupted)", style="yellow"))
        except Exception as exc:  # one line, and the chat goes on
            self.report.show(exc)

    def _say(self, text: str) -> None:
        self.console.print(Text(text, style="dim"), soft_wrap=True)

    def _where(self) -> str:
        info = self.bot.session_info(self.session_id)
        messages = "new" if info is None else count(info.message_count, "message")
        return f"session {self.session_id} ({messages})"

    # -- slash commands --------------------------------------------------------------------

    def _help(self, arg: str) -> None:
        table = Table(box=None, show_header=False, pad_edge=False)
        for usage, what in _HELP:
            table.add_row(usage, what)
        self.console.print(table)

    def _history(self, arg: str) -> None:
        messages = self.bot.history(self.session_id)
        if not messages:
            self._say(f"Session {self.session_id} has no messages yet.")
            return
        transcript(self.console, messages)

    def _usage(self, arg: str) -> None:
        usage = self.bot.usage(self.session_id)
        self.console.print(
            Text(f"session {self.session_id}, {count(usage.turns, 'turn')}: ").append(
                usage_line(usage)
            ),
            soft_wrap=True,
        )

    def _sessions(self, arg: str) -> None:
        self.console.print(sessions_table(session_infos(self.bot), current=self.session_id))

    def _switch(self, arg: str) -> None:
        if not arg:
            raise _UsageProblem("/switch ID")
        self.bot.session_info(arg)  # refuses an id that cannot key a session
        self.session_id = arg
        self._say(f"Now on {self._where()}.")

    def _system(self, arg: str) -> None:
        if not arg:
            raise _UsageProblem("/system TEXT")
        self.bot = self._chatbot(arg)
        self._say("The system prompt is changed for the rest of this chat.")

    def _save(self, arg: str) -> None:
        if not arg:
            raise _UsageProblem("/save FILE")
        path = Path(arg).expanduser()
        self.bot.export_session(self.session_id, path)
        self._say(f"Saved session {self.session_id} to {path}.")

    def _delete(self, arg: str) -> None:
        self.bot.delete(self.session_id)
        self._say(f"Session {self.session_id} is deleted; what it spent stays in the ledger.")

    def _reset(self, arg: str) -> None:
        self._say("/reset is now /delete.")
        self._delete(arg)
