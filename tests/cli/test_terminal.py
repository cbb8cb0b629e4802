"""``chatchain chat`` in a real pseudo-terminal: line editing, input history, streaming, Ctrl-C.

The installed ``chatchain`` script runs as a session leader with the pty as its controlling
terminal, so Ctrl-C (``\\x03``) reaches it as the terminal sends it: a key while
prompt_toolkit reads a line, SIGINT while a reply streams.
"""

from __future__ import annotations

import os
import re
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatchain.stores import open_store
from chatchain.testing import OpenAITestServer

termios = pytest.importorskip("termios")
fcntl = pytest.importorskip("fcntl")
pty = pytest.importorskip("pty")
pytestmark = pytest.mark.skipif(
    not hasattr(termios, "TIOCSCTTY"), reason="needs a controlling pseudo-terminal"
)

SCRIPT = Path(sys.executable).with_name("chatchain")
# Start a new session and take the pty (stdin) as its controlling terminal, then run argv.
LAUNCH = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r")
LEFT, UP, CTRL_C, CTRL_D = "\x1b[D", "\x1b[A", "\x03", "\x04"


class Terminal:
    """A program on a pseudo-terminal, read and typed at like pexpect does."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(SCRIPT), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
        )
        os.close(slave)
        self.screen = ""  # everything shown, without escape sequences
        self.seen = 0  # how much of it `expect` has consumed

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # the program has ended and closed the terminal
            return False
        self.screen = ESCAPES.sub("", self.screen + data.decode("utf-8", "replace"))
        return bool(data)

    def expect(self, pattern: str, timeout: float = 30.0) -> str:
        """Wait for ``pattern`` after what was expected last; return what matched."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while (match := regex.search(self.screen, self.seen)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(left, 0.2)) and self.process.poll() is not None):
                raise AssertionError(
                    f"{pattern!r} not shown; the screen ends with:\n{self.screen[-1500:]}"
                )
        self.seen = match.end()
        return match.group()

    def settle(self) -> None:
        """Read until the program has shown nothing for a moment (it waits for keys)."""
        while self._read(0.3):
            pass

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        os.close(self.master)


@pytest.fixture
def terminal_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,  # without OPENAI_* and CHATCHAIN_* (tests/conftest.py)
        "TERM": "xterm",
        "PROMPT_TOOLKIT_NO_CPR": "1",  # no cursor position requests to answer
        "CHATCHAIN_DATA_DIR": str(tmp_path / "data"),
        "CHATCHAIN_STORE": f"sqlite:///{tmp_path / 'chat.db'}",
    }


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    yield started
    for terminal in started:
        terminal.close()


def wait_for_prompt(terminal: Terminal) -> None:
    terminal.expect("you>")
    terminal.settle()


@pytest.mark.slow  # a real terminal, a new process
def test_chat_in_a_terminal(
    terminal_env: dict[str, str],
    terminals: list[Terminal],
    server: OpenAITestServer,
    tmp_path: Path,
) -> None:
    # Offline: edit a line, clear one with Ctrl-C, recall one with Up, leave with Ctrl-D.
    offline = Terminal(["chat", "--offline"], terminal_env)
    terminals.append(offline)
    offline.expect("OFFLINE: replies are echoes")
    session = offline.expect(r"session \w+ \(new\)").split()[1]
    wait_for_prompt(offline)
    offline.type(f"helo{LEFT}l\r")
    offline.expect(r"\(echo; I was sent 0 earlier messages\) hello\n")
    offline.expect(r"tokens \(\d+ prompt \+ \d+ completion\), \$0\.\d+, [\d.]+ s, first token")
    wait_for_prompt(offline)
    offline.type("discarded")
    offline.expect("discarded")
    offline.settle()
    offline.type(CTRL_C)
    offline.expect(r"discarded *\n+you>")  # the line is left as it was, and a new prompt shown
    offline.settle()
    offline.type("kept\r")
    offline.expect(r"\(echo; I was sent 2 earlier messages\) kept\n")
    wait_for_prompt(offline)
    offline.type(f"{UP}\r")  # the input history holds the line just sent
    offline.expect(r"\(echo; I was sent 4 earlier messages\) kept\n")
    wait_for_prompt(offline)
    offline.type(CTRL_D)
    assert offline.process.wait(30) == 0
    history = (tmp_path / "data" / "history").read_text()
    assert "+kept" in history and "discarded" not in history

    # A reply that streams for a long while: Ctrl-C stops it, and the chat goes on.
    env = {**terminal_env, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test"}
    online = Terminal(["chat"], env)
    terminals.append(online)
    online.expect(rf"session {session} \(6 messages\)")  # the latest session, resumed
    wait_for_prompt(online)
    words = [f"w{i}" for i in range(100_000)]
    server.queue_replies(" ".join(words))
    online.type("tell me everything\r")
    online.expect("w0 w1 w2 ")
    online.type(CTRL_C)
    online.expect(r"\n\(interrupted\)\n")
    # The endpoint never sent the usage of the cut stream: it was counted here, and says so.
    online.expect(r"~\d+ tokens \(\d+ prompt \+ \d+ completion\), estimated, ~\$")
    wait_for_prompt(online)
    online.type("/exit\r")
    assert online.process.wait(30) == 0

    store = open_store(terminal_env["CHATCHAIN_STORE"])
    try:
        messages = store.load(session)
    finally:
        store.close()
    assert [m.text for m in messages[:6]] == [
        "hello",
        "(echo; I was sent 0 earlier messages) hello",
        "kept",
        "(echo; I was sent 2 earlier messages) kept",
        "kept",
        "(echo; I was sent 4 earlier messages) kept",
    ]
    asked, partial = messages[6:]
    assert asked.text == "tell me everything"
    assert partial.response_metadata["interrupted"] is True
    assert partial.text.startswith("w0 w1 w2 ")
    assert len(partial.text.split()) < len(words)


@pytest.mark.slow  # a real terminal, a new process
def test_ask_streams_to_a_terminal(terminal_env: dict[str, str], terminals: list[Terminal]) -> None:
    ask = Terminal(["ask", "--offline", "hello there"], terminal_env)
    terminals.append(ask)
    ask.expect(r"\(echo; I was sent 0 earlier messages\) hello there\n")
    ask.expect(r"session \w+, \d+ tokens .* first token [\d.]+ s")  # only streams time it
    assert ask.process.wait(30) == 0
